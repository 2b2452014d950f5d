"""Shared plus private: what each adapter keeps of its own beside its cluster's bases.

Pure torch, no I/O. With a cluster's bases U, V (JD orders their directions by weight) an adapter's delta W_i is
kept as U_j S_i V_j^T (the leading j shared directions, S_i = U_j^T W_i V_j) plus X_i Y_i: the top p_i singular
directions of its residual R_i = W_i - U_j S_i V_j^T. j = 0 is per-adapter truncated SVD (every direction
private), p_i = 0 is plain JD; `allocate.py` chooses j per cluster and module and p_i per adapter by what they
store.

Why it looks the way it does:
- R_i is never formed. In the orthonormal basis [U, Q_i] of span(U, B_i) (Q_i from B_i's part outside U,
  orthonormalised through its k x k Gram) and [V, P_i] of span(V, A_i^T), W_i has (r + k) x (r + k) coordinates
  G_i = [C; Rb] [Z^T; Ra]^T with C = U^T B_i, Z = A_i V; cutting to j shared directions only zeroes the top-left
  j x j block of G_i. So one factorisation per adapter serves every candidate j, and each candidate costs one small
  batched SVD.
- Private factors are split evenly (X = u sqrt(s), Y = sqrt(s) v^T), so neither side is badly scaled in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor

# Shared ranks tried per cluster and module (cut to the fitted rank, which is always tried too).
RANK_GRID = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def rank_grid(r: int) -> list[int]:
    """The candidate shared ranks 0 .. r: RANK_GRID cut to r, and r itself."""
    return sorted({j for j in RANK_GRID if j <= r} | {r})


@dataclass
class Coordinates:
    """Members' deltas at one module in the cluster's extended bases, (L module positions, n members).

    W_i = [U, Ql_i] Lc_i Rc_i^T [V, Qr_i]^T with Lc_i = [C_i; Rb_i] ((r + k) x k) and Rc_i = [Z_i^T; Ra_i]."""

    U: Tensor  # (L, m, r)
    V: Tensor  # (L, d, r)
    Ql: Tensor | None  # (L, n, m, k) orthonormal part of B_i outside U (None once dropped: cores need only Lc, Rc)
    Qr: Tensor | None  # (L, n, d, k) orthonormal part of A_i^T outside V
    Lc: Tensor  # (L, n, r + k, k)
    Rc: Tensor  # (L, n, r + k, k)
    sq_norms: Tensor  # (L, n) float64 ||W_i||^2


def coordinates(B: Tensor, A: Tensor, U: Tensor, V: Tensor) -> Coordinates:
    """B: (L, n, m, k) with the scaling folded in, A: (L, n, k, d), U: (L, m, r), V: (L, d, r) orthonormal. Float64."""
    B, A, U, V = B.double(), A.double(), U.double(), V.double()
    C = U.mT.unsqueeze(1) @ B  # (L, n, r, k)
    Z = A @ V.unsqueeze(1)  # (L, n, k, r)
    Ql, Rb = _orth(B - U.unsqueeze(1) @ C)  # (L, n, m, k), (L, n, k, k)
    Qr, Ra = _orth(A.mT - V.unsqueeze(1) @ Z.mT)
    Lc = torch.cat([C, Rb], dim=-2)
    Rc = torch.cat([Z.mT, Ra], dim=-2)
    sq = ((Lc.mT @ Lc) * (Rc.mT @ Rc)).sum((-2, -1))
    return Coordinates(U, V, Ql, Qr, Lc, Rc, sq)


ORTH_CUT = 1e-6  # directions of X weaker than this (relative to its strongest) are dropped by _orth


def _orth(X: Tensor) -> tuple[Tensor, Tensor]:
    """X = Q R with Q's columns orthonormal or zero, through the k x k Gram (eigh) twice: a batched SVD of tall
    m x k matrices cost most of a refine. A direction X does not use gets a zero column of Q and a zero row of R
    (QR of a rank-deficient X may give it a column outside span(X), here possibly along U, with a non-zero
    coefficient). The second pass restores orthogonality to working precision (as CholeskyQR2 does)."""
    Q, R = _orth_once(X)
    Q2, R2 = _orth_once(Q)
    return Q2, R2 @ R


def _orth_once(X: Tensor) -> tuple[Tensor, Tensor]:
    vals, vecs = torch.linalg.eigh(X.mT @ X)
    s = vals.clamp_min(0).sqrt()
    keep = s > ORTH_CUT * s.amax(-1, keepdim=True)
    inv = torch.where(keep, 1.0 / s.clamp_min(1e-300), torch.zeros_like(s))
    Q = X @ (vecs * inv.unsqueeze(-2))
    return Q, (s * keep).unsqueeze(-1) * vecs.mT


def _residual_core(co: Coordinates, j: int) -> Tensor:
    """(L, n, r + k, r + k) coordinates of R_i = W_i - U_j U_j^T W_i V_j V_j^T."""
    G = co.Lc @ co.Rc.mT
    if j:
        G = G.clone()
        G[..., :j, :j] = 0
    return G


def residual_spectra(co: Coordinates, ranks: list[int], p_max: int) -> tuple[Tensor, Tensor]:
    """For each candidate shared rank j: (J, L, n) ||R_i||^2 (what the shared part leaves) and (J, L, n, p_max) the
    squared singular values of R_i, descending (zero past its rank)."""
    left, sig = [], []
    for j in ranks:
        s = torch.linalg.svdvals(_residual_core(co, j))
        s2 = s.pow(2)
        left.append(s2.sum(-1))
        top = torch.zeros(*s2.shape[:-1], p_max, dtype=s2.dtype)
        top[..., : min(p_max, s2.shape[-1])] = s2[..., :p_max]
        sig.append(top)
    return torch.stack(left), torch.stack(sig)


def private_factors(co: Coordinates, j: int, p: int, pos: int, i: int) -> tuple[Tensor, Tensor]:
    """Member i's top-p residual directions at module position pos and shared rank j: X (m, p), Y (p, d), float64."""
    G = _residual_core(co, j)[pos, i]
    u, s, vh = torch.linalg.svd(G)
    root = s[:p].sqrt()
    left = torch.cat([co.U[pos], co.Ql[pos, i]], dim=-1)  # (m, r + k)
    right = torch.cat([co.V[pos], co.Qr[pos, i]], dim=-1)  # (d, r + k)
    return left @ (u[:, :p] * root), (root[:, None] * vh[:p]) @ right.mT


def shared_core(co: Coordinates, j: int, pos: int, i: int) -> tuple[Tensor, Tensor]:
    """Member i's core at shared rank j as its exact factors (U_j^T B_i, A_i V_j): (j, k), (k, j)."""
    return co.Lc[pos, i, :j], co.Rc[pos, i, :j].mT
