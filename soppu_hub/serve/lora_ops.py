"""The math of one forward for a batch whose rows use different adapters: pure torch, no PEFT.

Factor pairs in slots: each adapter's (B, A) of one module position in a slot of two stacked tensors (zero-padded
to the largest rank); rows gather their slots and apply them with two batched matmuls (what BGMV kernels do on
GPUs); the factored cores of a shared basis use it (plain LoRA rows stack their own factors once per batch
composition in peft_patch). JD bundles: rows whose adapters share a basis pay x V and (.) U^T once for all of them
and only their cores per row: r x r, or two thin factors when the core was stored factored.
"""

from __future__ import annotations

import torch


def gathered_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """delta y for rows using different plain LoRAs. x (b, s, d); A (S, r, d); B (S, m, r) with the scaling in B;
    slots (b,) long, each row's slot. Returns (b, s, m)."""
    h = torch.bmm(x, A[slots].transpose(1, 2))  # (b, s, r)
    return torch.bmm(h, B[slots].transpose(1, 2))  # (b, s, m)


def shared_basis_lora(
    x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, cores: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """delta y for rows whose adapters share one basis: x V once, each row's core, then U^T once.
    x (b, s, d); U (m, R); V (d, R); cores (S, R, R); slots (b,). Returns (b, s, m)."""
    h = x @ V  # (b, s, R): one matmul for every row
    h = torch.bmm(h, cores[slots].transpose(1, 2))  # (b, s, R): S_i applied per row
    return h @ U.T


def shared_factored_lora(
    x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, Q: torch.Tensor, P: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """shared_basis_lora for cores kept as factors S_i = P_i Q_i: two thin per-row matmuls (2 R k) instead of R^2.
    Q (S, k, R), P (S, R, k), zero-padded to the largest k as stack_slots does."""
    return gathered_lora(x @ V, Q, P, slots) @ U.T


def stack_slots(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(B, A) per adapter, scaling in B] -> (A (S, r, d), B (S, m, r)), adapter i in slot i, each zero-padded to
    the largest rank r (zero directions add nothing)."""
    r = max(b.shape[1] for b, _ in factors)
    A = torch.stack([torch.nn.functional.pad(a, (0, 0, 0, r - a.shape[0])) for _, a in factors])
    B = torch.stack([torch.nn.functional.pad(b, (0, r - b.shape[1])) for b, _ in factors])
    return A, B
