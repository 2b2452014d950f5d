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
- With many adapters the K-sized eigenproblem costs (n k)^3 per step, so there is a second solver: block
  subspace iteration through the factors. Each half-step multiplies the current basis by the weighted Gram
  once (two passes over the factors, linear in n) and solves the Rayleigh-Ritz problem in span(current
  basis, Gram @ basis), a 2r x 2r eigh. The current basis lies in that span, so the objective still never
  decreases. "auto" takes whichever one iteration costs less by a fixed flop model (solver_costs).
- Weighted Grams sum_i F_i M_i F_i^T are one (p x n k) @ (n k x p) product with k x k middles, never n
  separate p x p terms: the memory is the factors', not n p^2.
- All module positions of one shape are a leading batch dimension: one batched QR / eigh / matmul per
  step instead of a Python loop over layers. A position whose objective has settled leaves the batch, so
  each gets what it would get alone and the slowest does not set everyone's cost. Same code on CPU and CUDA.
- JD-Full alternates exact maximisers (top eigenvectors of the weighted Grams), so the objective is
  monotone; JD-Diag alternates orthogonal Procrustes steps, also monotone. Both stop on the relative
  change of the objective and report how many iterations they took. No random init: deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .scoring import delta_sq_norms, factored_sq_errors, project_left, project_right, reconstruction_sq_errors

Tensor = torch.Tensor

METHODS = ("full", "diag")
WEIGHTINGS = ("norm", "none")  # w_i = 1/||W_i||^2, or all 1
SOLVERS = ("auto", "exact", "subspace")
EIGH_WEIGHT = 4.0  # a p x p eigh costs about 4 p^3 matmul flops on CPU (fitted to `bench kernel`-style timings)


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
    factors: tuple[Tensor, Tensor] | None = (
        None  # "full": (U^T B_i, A_i V), (L, n, r, k) and (L, n, k, r); cores = P @ Q
    )

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


def solver_costs(n: int, k: int, m: int, d: int, r: int) -> dict[str, float]:
    """Modelled cost of one iteration per module position, in matmul flops, for each JD-Full solver.

    exact: in each reduced space (p' = min(p, n k)) one Gram, 2 n k p'^2, and its eigh; subspace: per side one pass
    of the stacked factors against r columns and one against 2r, a QR of 2r columns and a 2r x 2r Ritz problem.
    Both take similar numbers of iterations on the benches, so "auto" compares one iteration. Fitted once and
    fixed (not timed at run time), so the same inputs always take the same path and give the same bytes."""
    K = n * k
    r = min(r, K, m, d)

    def exact(p: int) -> float:
        q = min(p, K)
        return 2.0 * K * q * q + EIGH_WEIGHT * q**3

    def subspace(p: int) -> float:
        return 6.0 * p * K * r + 4.0 * p * (2 * r) ** 2 + 2.0 * K * (2 * r) ** 2

    sub = subspace(m) + subspace(d) if 2 * r <= min(m, d) else math.inf
    return {"exact": exact(m) + exact(d), "subspace": sub}


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
    factors (cost linear in n), "auto" the one solver_costs prices lower at these shapes.
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
    if solver == "auto":
        costs = solver_costs(n, k, m, d, r)
        solver = "subspace" if costs["subspace"] < costs["exact"] else "exact"
    if solver == "subspace":
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
    V, _ = _top_eigvecs(_gram(As.mT, wc * (Bs.mT @ Bs)), r)

    def step(data: dict[str, Tensor], st: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        Bs, As, wc = data["B"], data["A"], data["w"]
        Z = project_right(As, st["V"])  # A_i V: sum_i w_i W_i V V^T W_i^T = sum_i B_i (w_i Z_i Z_i^T) B_i^T
        U, _ = _top_eigvecs(_gram(Bs, wc * (Z @ Z.mT)), r)
        C = project_left(U, Bs).mT  # B_i^T U
        V, obj = _top_eigvecs(_gram(As.mT, wc * (C @ C.mT)), r)  # obj = sum_i w_i ||U^T W_i V||^2
        return {"U": U, "V": V}, obj

    st = {"U": torch.zeros(L, m_, r, dtype=dtype, device=B.device), "V": V}
    st, iterations, converged = _until_converged(step, {"B": Bs, "A": As, "w": wc}, st, tol, max_iter)
    U, V = st["U"], st["V"]

    if method == "diag":
        U, V, it2, converged = _refine_diag(Bs, As, U, V, w, tol, max_iter)
        iterations += it2

    if QB is not None:
        U = QB @ U
    if QA is not None:
        V = QA @ V
    return _finish(B, A, Bc, Ac, U, V, sq_norms, iterations, converged, method)


def _finish(
    B: Tensor,
    A: Tensor,
    Bc: Tensor,
    Ac: Tensor,
    U: Tensor,
    V: Tensor,
    sq_norms: Tensor,
    iterations: int,
    converged: bool,
    method: str,
) -> JDResult:
    P, Q = project_left(U, Bc), project_right(Ac, V)  # (L, n, r, k), (L, n, k, r): the core's exact rank-k factors
    core = P @ Q  # (L, n, r, r) = U^T W_i V
    if method == "diag":
        cores = torch.diagonal(core, dim1=-2, dim2=-1).contiguous()
        sq_errors = reconstruction_sq_errors(B, A, U, V, torch.diag_embed(cores), sq_norms)
        return JDResult(U, V, cores, sq_norms, sq_errors, iterations, converged, method)
    sq_errors = factored_sq_errors(B, A, U, V, P, Q, sq_norms)
    return JDResult(U, V, core, sq_norms, sq_errors, iterations, converged, method, (P, Q))


def _gram(F: Tensor, M: Tensor) -> Tensor:
    """sum_i F_i M_i F_i^T for F: (L, n, p, k) and M: (L, n, k, k), as one (p x n k) @ (n k x p) product: no
    per-adapter p x p term is ever formed, and the cost is n k p^2 instead of n p^2 r."""
    L, n, p, k = F.shape
    T = (M @ F.mT).reshape(L, n * k, p)  # M_i F_i^T stacked
    return F.permute(0, 2, 1, 3).reshape(L, p, n * k) @ T


def _ritz(X: Tensor, E: Tensor, Z: Tensor, w: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rayleigh-Ritz for max tr(Q^T G Q), G = sum_i w_i F_i F_i^T with F_i = X^T W_i Y = E_i^T Z_i, where E_i is
    the k x 2r factor projected on X and Z_i the k x r one on the fixed side; G = sum_i E_i^T (w_i Z_i Z_i^T) E_i.

    Returns (X @ Q, Q, sum of the top r Ritz values) with Q the top-r eigenvectors of the 2r x 2r G."""
    Q, top = _top_eigvecs(_gram(E.mT, w[..., None, None] * (Z @ Z.mT)), r)
    return X @ Q, Q, top


def _sketch(F: Tensor, r: int) -> Tensor:
    """Deterministic start: an orthonormal basis of F^T @ Omega for a fixed-seed Gaussian Omega (drawn on the CPU,
    so CPU and CUDA start alike). F: (L, n*k, p) stacked factors; returns (L, p, r)."""
    g = torch.Generator().manual_seed(0)
    omega = torch.randn(F.shape[1], r, generator=g, dtype=torch.float64).to(F.device, F.dtype)  # one for all positions
    return torch.linalg.qr(F.mT @ omega, mode="reduced")[0]


def _start(F: Tensor, M: Tensor, r: int) -> Tensor:
    """A deterministic start for one side: Rayleigh-Ritz of G = sum_i F_i^T M_i F_i (F: (L, n k, p) stacked factors,
    M: (L, n, k, k) weighted Grams of the other factor) within a 2r-wide sketch of F's row space. Starting from G's
    leading directions rather than a bare sketch cut the iterations by up to half on the scale bench's families."""
    L, nk, p = F.shape
    n, k = M.shape[1], M.shape[2]
    X = _sketch(F, min(2 * r, p))
    Q, _ = _top_eigvecs(_gram((F @ X).reshape(L, n, k, X.shape[-1]).mT, M), r)
    return X @ Q


def _subspace_full(
    B: Tensor, A: Tensor, w: Tensor, r: int, tol: float, max_iter: int
) -> tuple[Tensor, Tensor, int, bool]:
    """JD-Full bases by block subspace iteration through the factors; every product is linear in n.

    With C_i = B_i^T U and Z_i = A_i V (k x r each), the U half-step forms G_U U = sum_i w_i B_i Z_i Z_i^T C_i,
    takes X = orth[U, G_U U] and keeps the best r-dimensional subspace of span(X) (Rayleigh-Ritz); the V
    half-step mirrors it. C_i and Z_i for the new bases come out of the projections already made.
    """
    L, n, m, k = B.shape
    Bt = B.mT.reshape(L, n * k, m)  # stacked B_i^T, one copy: each pass is one large matmul
    Af = A.reshape(L, n * k, A.shape[-1])  # stacked A_i, a view
    wk = w[..., None, None]
    U = _start(Bt, wk * (A @ A.mT), r)  # top of sum_i w_i W_i W_i^T within a sketch
    V = _start(Af, wk * (B.mT @ B), r)  # top of sum_i w_i W_i^T W_i within a sketch
    st = {"U": U, "V": V, "C": (Bt @ U).reshape(L, n, k, r), "Z": (Af @ V).reshape(L, n, k, r)}

    def step(data: dict[str, Tensor], st: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        Bt, Af, w = data["Bt"], data["Af"], data["w"]
        wk, U, V, C, Z = w[..., None, None], st["U"], st["V"], st["C"], st["Z"]
        La = Bt.shape[0]
        T = (wk * (Z @ (Z.mT @ C))).reshape(La, n * k, r)
        X = torch.linalg.qr(torch.cat([U, Bt.mT @ T], dim=-1), mode="reduced")[0]  # (La, m, 2r)
        E = (Bt @ X).reshape(La, n, k, 2 * r)  # B_i^T X
        U, Q, _ = _ritz(X, E, Z, w, r)
        C = project_right(E, Q)  # B_i^T U for the new U
        T = (wk * (C @ (C.mT @ Z))).reshape(La, n * k, r)
        Y = torch.linalg.qr(torch.cat([V, Af.mT @ T], dim=-1), mode="reduced")[0]  # (La, d, 2r)
        E = (Af @ Y).reshape(La, n, k, 2 * r)  # A_i Y
        V, Q, obj = _ritz(Y, E, C, w, r)
        return {"U": U, "V": V, "C": C, "Z": project_right(E, Q)}, obj  # Z: A_i V for the new V

    st, it, converged = _until_converged(step, {"Bt": Bt, "Af": Af, "w": w}, st, tol, max_iter)
    return st["U"], st["V"], it, converged


def _until_converged(
    step, data: dict[str, Tensor], state: dict[str, Tensor], tol: float, max_iter: int, prev: Tensor | None = None
) -> tuple[dict[str, Tensor], int, bool]:
    """Run `step(data, state) -> (state, objective)` until each module position's objective changes by at most
    `tol` relatively. Every tensor is indexed by position first. A converged position leaves the batch: the
    slowest position no longer sets the cost of all, and each position gets what it would get alone.
    Returns the final state, the most iterations any position took, and whether all converged."""
    out = {key: t.clone() for key, t in state.items()}
    active = torch.arange(next(iter(state.values())).shape[0], device=next(iter(state.values())).device)
    for it in range(1, max_iter + 1):
        state, obj = step(data, state)
        if prev is not None:
            done = (obj - prev).abs() <= tol * obj.abs().clamp_min(1e-30)
            if bool(done.any()):
                for key in out:
                    out[key][active[done]] = state[key][done]
                keep = ~done
                if not bool(keep.any()):
                    return out, it, True
                active, obj = active[keep], obj[keep]
                data = {key: t[keep] for key, t in data.items()}
                state = {key: t[keep] for key, t in state.items()}
        prev = obj
    for key in out:
        out[key][active] = state[key]
    return out, max_iter, False


def _refine_diag(
    Bs: Tensor, As: Tensor, U: Tensor, V: Tensor, w: Tensor, tol: float, max_iter: int
) -> tuple[Tensor, Tensor, int, bool]:
    """Alternating orthogonal Procrustes for diagonal cores, started from the JD-Full bases."""

    def diag_of(Bs: Tensor, As: Tensor, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
        Y = Bs @ project_right(As, V)  # W_i V, (L, n, m, r)
        return torch.diagonal(U.mT.unsqueeze(1) @ Y, dim1=-2, dim2=-1), Y  # (L, n, r)

    def step(data: dict[str, Tensor], st: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        Bs, As, w = data["B"], data["A"], data["w"]
        wc, V, d, Y = w[..., None, None], st["V"], st["d"], st["Y"]
        U = _polar((wc * (Y * d.unsqueeze(-2))).sum(1))
        Z = As.mT @ project_left(U, Bs).mT  # W_i^T U
        d = torch.diagonal(Z.mT @ V.unsqueeze(1), dim1=-2, dim2=-1)
        V = _polar((wc * (Z * d.unsqueeze(-2))).sum(1))
        d, Y = diag_of(Bs, As, U, V)
        return {"U": U, "V": V, "d": d, "Y": Y}, (w * (d**2).sum(-1)).sum(-1)

    d, Y = diag_of(Bs, As, U, V)
    st = {"U": U, "V": V, "d": d, "Y": Y}
    st, it, converged = _until_converged(
        step, {"B": Bs, "A": As, "w": w}, st, tol, max_iter, prev=(w * (d**2).sum(-1)).sum(-1)
    )
    return st["U"], st["V"], it, converged


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
