"""Joint diagonalization (JD) of LoRA deltas: shared bases U, V and one small core per adapter.

Pure torch, no I/O. For one module position and adapters i = 1..n with delta W_i = B_i A_i (scaling
already folded into B_i), find orthonormal U (m x r), V (d x r) and cores S_i minimising

    sum_i w_i ||W_i - U S_i V^T||_F^2

with S_i = U^T W_i V (JD-Full, r x r) or S_i = diag(U^T W_i V) (JD-Diag, r values). A JD-Full core has rank
at most k_i (the adapter's LoRA rank): S_i = (U^T B_i)(A_i V), returned as those factors too, so a caller can
store 2 r k_i numbers instead of r^2 when k_i < r / 2.

Why it looks the way it does:
- Every W_i is touched only through its factors; no m x d matrix is ever formed.
- The column space of every W_i lies in span(B_1..B_n) and the row space in span(A_1..A_n), so when
  K = n * k is smaller than m (or d) we QR the stacked factors once and solve an exact K-sized problem,
  then lift the bases back. For n = 1 this is the exact truncated SVD.
- With many adapters (n * k past EXACT_MAX_K) the K-sized eigenproblem costs (n k)^3 per step, so the
  solver switches to block subspace iteration through the factors: each half-step multiplies the
  current basis by the weighted Gram once (two passes over the factors, linear in n) and solves the
  Rayleigh-Ritz problem in span(current basis, Gram @ basis), a 2r x 2r eigh. The current basis lies in
  that span, so the objective still never decreases; warm starts carry across steps.
- All module positions of one shape are a leading batch dimension: one batched QR / eigh / matmul per
  step instead of a Python loop over layers. The same code runs on CPU and CUDA.
- JD-Full alternates exact maximisers (top eigenvectors of the weighted Grams), so the objective is
  monotone; JD-Diag alternates orthogonal Procrustes steps, also monotone. Both stop on the relative
  change of the objective and report how many iterations they took. No random init: deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

METHODS = ("full", "diag")
WEIGHTINGS = ("norm", "none")  # w_i = 1/||W_i||^2, or all 1
SOLVERS = ("auto", "exact", "subspace")
EXACT_MAX_K = 512  # n * k above which "auto" uses subspace iteration (the exact eigh grows like (n k)^3)


@dataclass
class JDResult:
    """Bases and cores for a batch of L module positions shared by n adapters."""

    U: Tensor  # (L, m, r) orthonormal columns
    V: Tensor  # (L, d, r) orthonormal columns
    cores: Tensor  # (L, n, r, r) for "full", (L, n, r) for "diag"
    sq_norms: Tensor  # (L, n) float64, ||W_i||_F^2
    sq_errors: Tensor  # (L, n) float64, ||W_i - U S_i V^T||_F^2
    iterations: int
    converged: bool
    method: str
    factors: tuple[Tensor, Tensor] | None = None  # "full": (U^T B_i, A_i V), (L, n, r, k) and (L, n, k, r); cores = P @ Q

    @property
    def rank(self) -> int:
        return self.U.shape[-1]

    @property
    def rel_errors(self) -> Tensor:
        """||W_i - U S_i V^T||_F / ||W_i||_F per module and adapter (0 for an all-zero delta)."""
        norms = self.sq_norms.clamp_min(0).sqrt()
        errs = self.sq_errors.clamp_min(0).sqrt()
        return torch.where(norms > 0, errs / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(errs))

    def dense_cores(self) -> Tensor:
        """Cores as (L, n, r, r) matrices whatever the method."""
        return torch.diag_embed(self.cores) if self.method == "diag" else self.cores


def delta_sq_norms(B: Tensor, A: Tensor) -> Tensor:
    """||B A||_F^2 = tr((B^T B)(A A^T)) in float64, from the factors only. Shapes (..., m, k), (..., k, d)."""
    B64, A64 = B.double(), A.double()
    return ((B64.mT @ B64) * (A64 @ A64.mT)).sum(dim=(-2, -1))


def reconstruction_sq_errors(B: Tensor, A: Tensor, U: Tensor, V: Tensor, cores: Tensor) -> Tensor:
    """||W_i - U S_i V^T||_F^2 in float64 for the stored (rounded) U, V, S, without forming W_i.

    Uses ||W||^2 - 2 <S, U^T W V> + tr(S^T U^T U S V^T V), which does not assume U, V are exactly
    orthonormal, so it scores what is actually saved. B: (L, n, m, k), A: (L, n, k, d),
    U: (L, m, r), V: (L, d, r), cores: (L, n, r, r).
    """
    B64, A64 = B.double(), A.double()
    U64, V64, S64 = U.double(), V.double(), cores.double()
    P = (U64.mT.unsqueeze(1) @ B64) @ (A64 @ V64.unsqueeze(1))  # (L, n, r, r) = U^T W V
    gu = (U64.mT @ U64).unsqueeze(1)
    gv = (V64.mT @ V64).unsqueeze(1)
    quad = (S64.mT @ gu @ S64 * gv).sum(dim=(-2, -1))  # tr(S^T Gu S Gv), Gv symmetric
    return delta_sq_norms(B, A) - 2 * (S64 * P).sum(dim=(-2, -1)) + quad


def factored_rel_error(B: Tensor, A: Tensor, B2: Tensor, A2: Tensor) -> float:
    """||B A - B2 A2||_F / ||B A||_F in float64 from the factors (0 for an all-zero delta); any rank pair."""
    Bx, Ax, B2x, A2x = B.double(), A.double(), B2.double(), A2.double()
    norm = float(delta_sq_norms(Bx, Ax))
    cross = float(((B2x.mT @ Bx) * (A2x @ Ax.mT)).sum())  # <B A, B2 A2> = tr((B2^T B)(A A2^T))
    sq = norm - 2 * cross + float(delta_sq_norms(B2x, A2x))
    return math.sqrt(max(sq, 0.0) / norm) if norm > 0 else 0.0


def _top_eigvecs(sym: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Top-r eigenvectors (descending) of a batch of symmetric matrices, and the sum of their eigenvalues."""
    sym = 0.5 * (sym + sym.mT)
    vals, vecs = torch.linalg.eigh(sym)
    return vecs[..., -r:].flip(-1), vals[..., -r:].sum(-1)


def _polar(X: Tensor) -> Tensor:
    """Closest matrix with orthonormal columns to X (orthogonal Procrustes)."""
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def _reduce(F: Tensor) -> tuple[Tensor | None, Tensor]:
    """QR-reduce stacked factors. F: (L, n, p, k) with p the long side.

    Returns (Q, F_small) with F_i = Q @ F_small_i, Q: (L, p, n*k); or (None, F) when n*k >= p,
    where reducing would not make the problem smaller.
    """
    L, n, p, k = F.shape
    K = n * k
    if K >= p:
        return None, F
    stacked = F.permute(0, 2, 1, 3).reshape(L, p, K)
    Q, R = torch.linalg.qr(stacked, mode="reduced")
    small = R.reshape(L, K, n, k).permute(0, 2, 1, 3)
    return Q, small


def _resolve_weights(weights: str | Tensor, sq_norms: Tensor, dtype: torch.dtype) -> Tensor:
    if isinstance(weights, Tensor):
        w = weights.to(sq_norms.device, torch.float64).expand_as(sq_norms)
    elif weights == "norm":
        w = torch.where(sq_norms > 0, 1.0 / sq_norms.clamp_min(1e-300), torch.zeros_like(sq_norms))
    elif weights == "none":
        w = torch.ones_like(sq_norms)
    else:
        raise ValueError(f"weights must be one of {WEIGHTINGS} or a tensor, not {weights!r}")
    # Rescale per module so the largest weight is 1: the optimum is unchanged, float32 stays well-scaled.
    w = w / w.amax(dim=-1, keepdim=True).clamp_min(1e-300)
    return w.to(dtype)


def joint_diagonalize(
    B: Tensor,
    A: Tensor,
    rank: int,
    *,
    method: str = "full",
    weights: str | Tensor = "norm",
    tol: float = 1e-6,
    max_iter: int = 200,
    dtype: torch.dtype = torch.float32,
    solver: str = "auto",
) -> JDResult:
    """Jointly compress n adapters over a batch of L same-shaped module positions.

    B: (L, n, m, k) with the scaling folded in, A: (L, n, k, d); ranks that differ across adapters
    are zero-padded to a common k (zero columns change nothing). `weights` is "norm"
    (w_i = 1 / ||W_i||^2, so each adapter is fitted relative to its own size), "none" (the seeds'
    unweighted objective) or a tensor broadcastable to (L, n).

    The shared rank is min(rank, m', d') where m', d' are the dimensions after reduction (at most
    n * k): beyond that every adapter is already represented exactly. `solver` "exact" solves each
    half-step's eigenproblem in the QR-reduced space, "subspace" by one Rayleigh-Ritz step through the
    factors (cost linear in n), "auto" takes "exact" while n * k <= EXACT_MAX_K.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, not {solver!r}")
    if B.dim() != 4 or A.dim() != 4 or B.shape[:2] != A.shape[:2] or B.shape[-1] != A.shape[-2]:
        raise ValueError(f"expected B (L, n, m, k) and A (L, n, k, d), got {tuple(B.shape)} and {tuple(A.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")

    sq_norms = delta_sq_norms(B, A)
    w = _resolve_weights(weights, sq_norms, dtype)
    Bc, Ac = B.to(dtype), A.to(dtype)
    L, n, m, k = B.shape
    d = A.shape[-1]
    r = min(rank, n * k, m, d)
    if solver == "subspace" or (solver == "auto" and n * k > EXACT_MAX_K):
        if 2 * r <= min(m, d):
            U, V, iterations, converged = _subspace_full(Bc, Ac, w, r, tol, max_iter)
            if method == "diag":
                U, V, it2, converged = _refine_diag(Bc, Ac, U, V, w, tol, max_iter)
                iterations += it2
            return _finish(B, A, Bc, Ac, U, V, sq_norms, iterations, converged, method)
    QB, Bs = _reduce(Bc)
    QA, AsT = _reduce(Ac.mT)
    As = AsT.mT  # (L, n, k, d')
    m_, d_ = Bs.shape[-2], As.shape[-1]
    r = min(rank, m_, d_)
    wc = w[..., None, None]

    # Deterministic SVD init: V = top right singular vectors of the weighted stack of W_i.
    BtB = Bs.mT @ Bs
    V, _ = _top_eigvecs((wc * (As.mT @ BtB @ As)).sum(1), r)

    def u_step(V: Tensor) -> tuple[Tensor, Tensor]:
        Y = Bs @ (As @ V.unsqueeze(1))  # W_i V, (L, n, m', r)
        return _top_eigvecs((wc * (Y @ Y.mT)).sum(1), r)

    def v_step(U: Tensor) -> tuple[Tensor, Tensor]:
        Z = As.mT @ (Bs.mT @ U.unsqueeze(1))  # W_i^T U, (L, n, d', r)
        return _top_eigvecs((wc * (Z @ Z.mT)).sum(1), r)

    prev = None
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):
        U, _ = u_step(V)
        V, obj = v_step(U)  # obj = sum_i w_i ||U^T W_i V||^2
        if prev is not None and bool(((obj - prev).abs() <= tol * obj.abs().clamp_min(1e-30)).all()):
            converged = True
            break
        prev = obj

    if method == "diag":
        U, V, it2, converged = _refine_diag(Bs, As, U, V, w, tol, max_iter)
        iterations += it2

    if QB is not None:
        U = QB @ U
    if QA is not None:
        V = QA @ V
    return _finish(B, A, Bc, Ac, U, V, sq_norms, iterations, converged, method)


def _finish(B: Tensor, A: Tensor, Bc: Tensor, Ac: Tensor, U: Tensor, V: Tensor, sq_norms: Tensor, iterations: int,
            converged: bool, method: str) -> JDResult:
    P, Q = U.mT.unsqueeze(1) @ Bc, Ac @ V.unsqueeze(1)  # (L, n, r, k), (L, n, k, r): the core's exact rank-k factors
    core = P @ Q  # (L, n, r, r) = U^T W_i V
    cores = torch.diagonal(core, dim1=-2, dim2=-1).contiguous() if method == "diag" else core
    dense = torch.diag_embed(cores) if method == "diag" else cores
    sq_errors = reconstruction_sq_errors(B, A, U, V, dense)
    factors = (P, Q) if method == "full" else None
    return JDResult(U, V, cores, sq_norms, sq_errors, iterations, converged, method, factors)


def _ritz(X: Tensor, P: Tensor, w: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rayleigh-Ritz for max tr(Q^T G Q), G = sum_i w_i F_i F_i^T with F_i = X^T W_i Y (rows of P, (L, n, 2r, r)).

    Returns (X @ Q, Q, sum of the top r Ritz values) with Q the top-r eigenvectors of the 2r x 2r G."""
    G = (w[..., None, None] * (P @ P.mT)).sum(1)
    Q, top = _top_eigvecs(G, r)
    return X @ Q, Q, top


def _sketch(F: Tensor, r: int) -> Tensor:
    """Deterministic start: an orthonormal basis of F^T @ Omega for a fixed-seed Gaussian Omega (drawn on the CPU,
    so CPU and CUDA start alike). F: (L, n*k, p) stacked factors; returns (L, p, r)."""
    g = torch.Generator().manual_seed(0)
    omega = torch.randn(F.shape[0], F.shape[1], r, generator=g, dtype=torch.float64).to(F.device, F.dtype)
    return torch.linalg.qr(F.mT @ omega, mode="reduced")[0]


def _subspace_full(B: Tensor, A: Tensor, w: Tensor, r: int, tol: float, max_iter: int) -> tuple[Tensor, Tensor, int, bool]:
    """JD-Full bases by block subspace iteration through the factors; every product is linear in n.

    With C_i = B_i^T U and Z_i = A_i V (k x r each), the U half-step forms G_U U = sum_i w_i B_i Z_i Z_i^T C_i,
    takes X = orth[U, G_U U] and keeps the best r-dimensional subspace of span(X) (Rayleigh-Ritz); the V
    half-step mirrors it. C_i and Z_i for the new bases come out of the projections already made.
    """
    L, n, m, k = B.shape
    Bt = B.mT.reshape(L, n * k, m)  # stacked B_i^T, one copy: each pass is one large matmul
    Af = A.reshape(L, n * k, A.shape[-1])  # stacked A_i, a view
    wk = w[..., None, None]
    U, V = _sketch(Bt, r), _sketch(Af, r)
    C = (Bt @ U).reshape(L, n, k, r)
    Z = (Af @ V).reshape(L, n, k, r)
    prev, converged, it = None, False, 0
    for it in range(1, max_iter + 1):
        T = (wk * (Z @ (Z.mT @ C))).reshape(L, n * k, r)
        X = torch.linalg.qr(torch.cat([U, Bt.mT @ T], dim=-1), mode="reduced")[0]  # (L, m, 2r)
        E = (Bt @ X).reshape(L, n, k, 2 * r)  # B_i^T X
        U, Q, _ = _ritz(X, E.mT @ Z, w, r)
        C = E @ Q.unsqueeze(1)  # B_i^T U for the new U
        T = (wk * (C @ (C.mT @ Z))).reshape(L, n * k, r)
        Y = torch.linalg.qr(torch.cat([V, Af.mT @ T], dim=-1), mode="reduced")[0]  # (L, d, 2r)
        E = (Af @ Y).reshape(L, n, k, 2 * r)  # A_i Y
        V, Q, obj = _ritz(Y, E.mT @ C, w, r)
        Z = E @ Q.unsqueeze(1)  # A_i V for the new V
        if prev is not None and bool(((obj - prev).abs() <= tol * obj.abs().clamp_min(1e-30)).all()):
            converged = True
            break
        prev = obj
    return U, V, it, converged


def _refine_diag(
    Bs: Tensor, As: Tensor, U: Tensor, V: Tensor, w: Tensor, tol: float, max_iter: int
) -> tuple[Tensor, Tensor, int, bool]:
    """Alternating orthogonal Procrustes for diagonal cores, started from the JD-Full bases."""
    wc = w[..., None, None]

    def diag_of(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
        Y = Bs @ (As @ V.unsqueeze(1))
        return torch.diagonal(U.mT.unsqueeze(1) @ Y, dim1=-2, dim2=-1), Y  # (L, n, r)

    d, Y = diag_of(U, V)
    prev = (w * (d**2).sum(-1)).sum(-1)
    for it in range(1, max_iter + 1):
        U = _polar((wc * (Y * d.unsqueeze(-2))).sum(1))
        Z = As.mT @ (Bs.mT @ U.unsqueeze(1))
        d = torch.diagonal(Z.mT @ V.unsqueeze(1), dim1=-2, dim2=-1)
        V = _polar((wc * (Z * d.unsqueeze(-2))).sum(1))
        d, Y = diag_of(U, V)
        obj = (w * (d**2).sum(-1)).sum(-1)
        if bool(((obj - prev).abs() <= tol * obj.abs().clamp_min(1e-30)).all()):
            return U, V, it, True
        prev = obj
    return U, V, max_iter, False


def leading_rank(cores: torch.Tensor, sq_norms: torch.Tensor, target: float) -> tuple[int, torch.Tensor]:
    """The smallest leading rank j at which every adapter's relative error <= target (else the full rank), and the
    errors there. With orthonormal bases ||W - U' S' V'^T||^2 = ||W||^2 - ||S[:j, :j]||^2. cores (n, r, r)."""
    r = cores.shape[-1]
    kept = torch.stack([cores[:, :j, :j].pow(2).sum((-2, -1)) for j in range(1, r + 1)], dim=1)  # (n, r)
    norms = sq_norms.double()[:, None]
    rel = ((norms - kept).clamp_min(0) / norms.clamp_min(1e-300)).sqrt()
    rel = torch.where(norms > 0, rel, torch.zeros_like(rel))
    ok = (rel <= target).all(0).nonzero()
    j = int(ok[0]) + 1 if len(ok) else r
    return j, rel[:, j - 1]
