"""One forward for a batch whose rows use different adapters: the math, pure torch (issue 13, item 1).

Plain LoRAs: every adapter's (A, B) of one module position sits in a slot of two stacked tensors (zero-padded
to the largest rank; slot 0 is all zeros, "no adapter"); a batch gathers its rows' slots and applies them with
two batched matmuls (what BGMV kernels do on GPUs). JD bundles: rows whose adapters share a basis pay x V and
(.) U^T once for all of them and only their r x r cores per row. Not yet wired into the engine.
"""

from __future__ import annotations

import torch


def gathered_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """delta y for rows using different plain LoRAs. x (b, s, d); A (S, r, d); B (S, m, r) with the scaling in B;
    slots (b,) long, each row's slot. Returns (b, s, m)."""
    h = torch.bmm(x, A[slots].transpose(1, 2))  # (b, s, r)
    return torch.bmm(h, B[slots].transpose(1, 2))  # (b, s, m)


def shared_basis_lora(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, cores: torch.Tensor, slots: torch.Tensor
                      ) -> torch.Tensor:
    """delta y for rows whose adapters share one basis: x V once, each row's core, then U^T once.
    x (b, s, d); U (m, R); V (d, R); cores (S, R, R); slots (b,). Returns (b, s, m)."""
    h = x @ V  # (b, s, R): one matmul for every row
    h = torch.bmm(h, cores[slots].transpose(1, 2))  # (b, s, R): S_i applied per row
    return h @ U.T


def stack_slots(factors: list[tuple[torch.Tensor, torch.Tensor] | None], *, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """[(B, A) or None per adapter] -> (A (S, r, d), B (S, m, r)) with slot 0 zero and adapter i in slot i + 1."""
    present = [f for f in factors if f is not None]
    if not present:
        raise ValueError("no adapter adapts this module")
    m, d = present[0][0].shape[0], present[0][1].shape[1]
    r = max(b.shape[1] for b, _ in present)
    A = torch.zeros(len(factors) + 1, r, d, dtype=dtype)
    B = torch.zeros(len(factors) + 1, m, r, dtype=dtype)
    for i, f in enumerate(factors, start=1):
        if f is not None:
            b, a = f
            A[i, : a.shape[0]] = a.to(dtype)
            B[i, :, : b.shape[1]] = b.to(dtype)
    return A, B
