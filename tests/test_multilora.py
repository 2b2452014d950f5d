"""The mixed-batch LoRA math: one gathered forward equals each row run with its own adapter."""

import torch

from soppu_hub.serve.multilora import gathered_lora, shared_basis_lora, stack_slots


def _rows(n=3, s=5, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, s, d, generator=g, dtype=torch.float64), g


def test_gathered_plain_loras_equal_one_adapter_per_row():
    x, g = _rows()
    m = 7
    factors = [(torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, 12, generator=g, dtype=torch.float64))
               for r in (2, 4)] + [None]
    A, B = stack_slots(factors, dtype=torch.float64)
    assert A.shape == (4, 4, 12) and B.shape == (4, 7, 4) and not A[0].any() and not A[3].any()
    slots = torch.tensor([1, 0, 2])  # row 0: adapter 0, row 1: no adapter, row 2: adapter 1
    out = gathered_lora(x, A, B, slots)
    for row, adapter in ((0, 0), (2, 1)):
        b, a = factors[adapter]
        torch.testing.assert_close(out[row], x[row] @ a.T @ b.T)
    assert not out[1].any()


def test_shared_basis_rows_equal_their_reconstructed_adapters():
    x, g = _rows(n=4)
    m, R = 9, 3
    U = torch.linalg.qr(torch.randn(m, R, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(12, R, generator=g, dtype=torch.float64))[0]
    cores = torch.randn(3, R, R, generator=g, dtype=torch.float64)
    cores[0] = 0  # slot 0: no adapter
    slots = torch.tensor([2, 1, 0, 2])
    out = shared_basis_lora(x, U, V, cores, slots)
    for row in range(4):
        torch.testing.assert_close(out[row], x[row] @ (U @ cores[slots[row]] @ V.T).T)
