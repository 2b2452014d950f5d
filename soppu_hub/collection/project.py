"""A new adapter onto fixed bases: which cluster, its exact cores, its error. Pure torch, no I/O.

With the bases fixed, the best core for W = B A is S = U^T W V (least squares, U and V orthonormal), and it has
rank at most k: kept as its factors P = U^T B (r x k) and Q = A V (k x r), so joining costs two thin products
per module and nothing is refitted. The error is scored with the same formula as every compression.
"""

from __future__ import annotations

import torch

from ..compression.scoring import delta_sq_norms, factored_sq_errors, project_left, project_right

Tensor = torch.Tensor


def cluster_order(signature: Tensor, centroids: Tensor) -> list[int]:
    """Clusters nearest first by cosine similarity of the adapter's signature to each cluster's centroid (the mean
    of its members' unit signatures), so the joiner downloads the bases most likely to hold it."""
    sig = signature.double() / signature.double().norm().clamp_min(1e-30)
    cen = centroids.double() / centroids.double().norm(dim=1, keepdim=True).clamp_min(1e-30)
    return torch.argsort(cen @ sig, descending=True, stable=True).tolist()


def project_module(B: Tensor, A: Tensor, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor, float]:
    """(P, Q, relative error) of one module: delta B A (scaling folded into B) against bases U (m x r), V (d x r)."""
    work = torch.float64 if B.dtype == torch.float64 else torch.float32
    B4, A4 = B.to(work)[None, None], A.to(work)[None, None]
    U3, V3 = U.to(work)[None], V.to(work)[None]
    P, Q = project_left(U3, B4), project_right(A4, V3)  # (1, 1, r, k), (1, 1, k, r)
    norms = delta_sq_norms(B4, A4)
    sq, norm = float(factored_sq_errors(B4, A4, U3, V3, P, Q, norms)[0, 0]), float(norms[0, 0])
    rel = (max(sq, 0.0) / norm) ** 0.5 if norm > 0 else 0.0
    return P[0, 0], Q[0, 0], rel
