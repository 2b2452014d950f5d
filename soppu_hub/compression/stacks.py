"""One module position's LoRA factors stacked across adapters: what the kernel and the pricing read."""

from __future__ import annotations

import torch

from ..peft_format.read import LoraAdapter


def stack_factors(
    adapters: list[LoraAdapter], names: list[str], present: tuple[int, ...], kmax: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, n, m, kmax) and (L, n, kmax, d) factor stacks, zero-padded where an adapter's rank is lower."""
    first = adapters[present[0]].modules[names[0]]
    (m, d), L, n = first.shape, len(names), len(present)
    dtype = torch.float64 if any(adapters[i].dtype == torch.float64 for i in present) else torch.float32
    B = torch.zeros(L, n, m, kmax, dtype=dtype)
    A = torch.zeros(L, n, kmax, d, dtype=dtype)
    for j, name in enumerate(names):
        for p, i in enumerate(present):
            mod = adapters[i].modules[name]
            b, a = mod.factors()  # a streamed module is read from its file here, and dropped after the copy
            B[j, p, :, : mod.rank] = b
            A[j, p, : mod.rank, :] = a
    return B.to(device), A.to(device)
