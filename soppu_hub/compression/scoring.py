"""Scoring a compression from the factors: ||W||^2 and ||W - W'||^2 in float64, no m x d matrix formed.

Pure torch, no I/O. Shared by the kernel (what it reports), the planner and the benches, so every error
anyone prints is computed by the same formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Tensor = torch.Tensor


def project_left(U: Tensor, B: Tensor) -> Tensor:
    """U^T B_i for every adapter, (L, n, r, k), as one r x m by m x n k product (a broadcast batched matmul is
    several times slower on CPU)."""
    L, n, m, k = B.shape
    return (U.mT @ B.permute(0, 2, 1, 3).reshape(L, m, n * k)).reshape(L, -1, n, k).permute(0, 2, 1, 3)


def project_right(A: Tensor, V: Tensor) -> Tensor:
    """A_i V for every adapter, (L, n, k, r), as one n k x d by d x r product (V: (L, d, r))."""
    L, n, k, d = A.shape
    return (A.reshape(L, n * k, d) @ V).reshape(L, n, k, -1)


def _by_position(score: Callable[..., Tensor], *stacks: Tensor | None) -> Tensor:
    """score(...) one module position (leading dim) at a time: float64 copies of a whole (L, n, m, k) stack cost
    gigabytes and run 3-6x slower than the same work position by position, which stays in cache."""
    L = stacks[0].shape[0]
    return torch.cat([score(*(None if s is None else s[pos : pos + 1] for s in stacks)) for pos in range(L)])


def delta_sq_norms(B: Tensor, A: Tensor) -> Tensor:
    """||B A||_F^2 = tr((B^T B)(A A^T)) in float64, from the factors only. Shapes (..., m, k), (..., k, d)."""
    if B.dim() == 4 and B.shape[0] > 1:
        return _by_position(delta_sq_norms, B, A)
    B64, A64 = B.double(), A.double()
    return ((B64.mT @ B64) * (A64 @ A64.mT)).sum(dim=(-2, -1))


def reconstruction_sq_errors(
    B: Tensor, A: Tensor, U: Tensor, V: Tensor, cores: Tensor, sq_norms: Tensor | None = None
) -> Tensor:
    """||W_i - U S_i V^T||_F^2 in float64 for the stored (rounded) U, V, S, without forming W_i.

    Uses ||W||^2 - 2 <S, U^T W V> + tr(S^T U^T U S V^T V), which does not assume U, V are exactly
    orthonormal, so it scores what is actually saved. B: (L, n, m, k), A: (L, n, k, d),
    U: (L, m, r), V: (L, d, r), cores: (L, n, r, r); sq_norms: (L, n) ||W_i||^2 when already known.
    """
    if B.shape[0] > 1:
        return _by_position(reconstruction_sq_errors, B, A, U, V, cores, sq_norms)
    B64, A64 = B.double(), A.double()
    U64, V64, S64 = U.double(), V.double(), cores.double()
    P = project_left(U64, B64) @ project_right(A64, V64)  # (L, n, r, r) = U^T W V
    gu = (U64.mT @ U64).unsqueeze(1)
    gv = (V64.mT @ V64).unsqueeze(1)
    quad = (S64.mT @ gu @ S64 * gv).sum(dim=(-2, -1))  # tr(S^T Gu S Gv), Gv symmetric
    norms = delta_sq_norms(B, A) if sq_norms is None else sq_norms.double()
    return norms - 2 * (S64 * P).sum(dim=(-2, -1)) + quad


def factored_sq_errors(
    B: Tensor, A: Tensor, U: Tensor, V: Tensor, P: Tensor, Q: Tensor, sq_norms: Tensor | None = None
) -> Tensor:
    """||W_i - U (P_i Q_i) V^T||_F^2 in float64 for a core kept as factors P: (L, n, r, k), Q: (L, n, k, r).

    The same scoring as reconstruction_sq_errors (no orthonormality assumed), but every term is a k x k
    product: <P Q, U^T W V> = tr((P^T U^T B)(A V Q^T)) and ||U P Q V^T||^2 = tr((P^T Gu P)(Q Gv Q^T)).
    """
    if B.shape[0] > 1:
        return _by_position(factored_sq_errors, B, A, U, V, P, Q, sq_norms)
    B64, A64, U64, V64 = B.double(), A.double(), U.double(), V.double()
    P64, Q64 = P.double(), Q.double()
    UtB, AV = project_left(U64, B64), project_right(A64, V64)  # (L, n, r, k), (L, n, k, r)
    cross = ((P64.mT @ UtB) * (AV @ Q64.mT).mT).sum(dim=(-2, -1))
    gu, gv = (U64.mT @ U64).unsqueeze(1), (V64.mT @ V64).unsqueeze(1)
    quad = ((P64.mT @ gu @ P64) * (Q64 @ gv @ Q64.mT)).sum(dim=(-2, -1))  # both k x k symmetric
    norms = delta_sq_norms(B, A) if sq_norms is None else sq_norms.double()
    return norms - 2 * cross + quad


def factored_rel_error(B: Tensor, A: Tensor, B2: Tensor, A2: Tensor) -> float:
    """||B A - B2 A2||_F / ||B A||_F in float64 from the factors (0 for an all-zero delta); any rank pair."""
    Bx, Ax, B2x, A2x = B.double(), A.double(), B2.double(), A2.double()
    norm = float(delta_sq_norms(Bx, Ax))
    cross = float(((B2x.mT @ Bx) * (A2x @ Ax.mT)).sum())  # <B A, B2 A2> = tr((B2^T B)(A A2^T))
    sq = norm - 2 * cross + float(delta_sq_norms(B2x, A2x))
    return math.sqrt(max(sq, 0.0) / norm) if norm > 0 else 0.0
