"""Which adapters share a basis: adapter signatures, deterministic k-means, the choice of K, reassignment.

Pure torch, no I/O. Adapters trained for different tasks occupy different subspaces; one basis for all of
them wastes its rank (the Compress-then-Serve paper clusters 1000 LoRAs for this reason). But every cluster
stores its own bases, so K is chosen by stored parameters against error, not by error alone. The signature of
an adapter is a sketch of where its deltas live: for a few probe modules, the column and row "covariances"
U_W diag(s^2) U_W^T / sum(s^2) of W = B A (from the factors' QR and a k x k SVD), each sketched with a
fixed Gaussian to p x p. Two adapters whose deltas use the same directions get nearby signatures whatever
their cores. k-means on signatures gives the first assignment; the compression step then refines it on the
real objective (each adapter to the cluster whose bases reconstruct it best).
"""

from __future__ import annotations

import torch

from .scoring import delta_sq_norms, project_left, project_right

Tensor = torch.Tensor

SKETCH = 16  # p: each side of a probe module becomes a p x p sketch
MAX_AUTO_K = 16  # --clusters auto tries K = 1 .. min(MAX_AUTO_K, n // 2)


def _sketch_matrix(dim: int, p: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, p, generator=g, dtype=torch.float64) / p**0.5


def module_signature(B: Tensor, A: Tensor, seed: int = 0) -> Tensor:
    """(n, 2 p^2) signatures of one module position; B: (n, m, k), A: (n, k, d), scaling folded in."""
    B64, A64 = B.double(), A.double()
    QB, RB = torch.linalg.qr(B64)
    QA, RA = torch.linalg.qr(A64.mT)
    Us, s, Vsh = torch.linalg.svd(RB @ RA.mT)  # W = QB Us diag(s) Vs^T QA^T
    weight = s.pow(2) / s.pow(2).sum(-1, keepdim=True).clamp_min(1e-300)
    out = []
    for Q, R in ((QB, Us), (QA, Vsh.mT)):
        Om = _sketch_matrix(Q.shape[-2], SKETCH, seed + Q.shape[-2]).to(Q.device)
        X = (Om.mT.unsqueeze(0) @ Q @ R) * weight.sqrt().unsqueeze(-2)  # (n, p, k)
        out.append((X @ X.mT).flatten(1))
    return torch.cat(out, dim=1)


def normalise(sig: Tensor) -> Tensor:
    """Unit rows: k-means on them is k-means on cosine distance."""
    return sig / sig.norm(dim=1, keepdim=True).clamp_min(1e-30)


def kmeans(X: Tensor, k: int, iters: int = 50) -> Tensor:
    """Deterministic k-means: farthest-point (k-means++ without the dice) start from the point nearest the
    mean, then Lloyd steps until the assignment stops changing. Returns labels (n,) numbered by first member."""
    n = X.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} clusters of {n} adapters")
    centres = [int(((X - X.mean(0)).pow(2).sum(1)).argmin())]
    dist = (X - X[centres[0]]).pow(2).sum(1)
    for _ in range(1, k):
        centres.append(int(dist.argmax()))
        dist = torch.minimum(dist, (X - X[centres[-1]]).pow(2).sum(1))
    C = X[centres].clone()
    labels = torch.cdist(X, C).argmin(1)
    for _ in range(iters):
        for c in range(k):
            members = labels == c
            if members.any():
                C[c] = X[members].mean(0)
        new = torch.cdist(X, C).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return renumber(labels)


def renumber(labels: Tensor) -> Tensor:
    """Clusters numbered in order of their first adapter, empty ones dropped: the same split reads the same."""
    order: dict[int, int] = {}
    for c in labels.tolist():
        order.setdefault(c, len(order))
    return torch.tensor([order[c] for c in labels.tolist()], dtype=torch.long)


def choose_k(errors: dict[int, float], params: dict[int, float], *, meets: dict[int, bool] | None = None) -> int:
    """--clusters auto: errors[K] is the mean relative error with K clusters on the probe modules, params[K] what
    they store there. Each cluster stores its own bases, so a split must cut the error by more than it multiplies
    the stored parameters: the K with the smallest error x parameters (ties: fewer parameters). Planted families
    cut the error many-fold at the right K; more clusters than that only fit each adapter's own noise, a small cut
    for K times the bases. With --target-error, meets[K] says whether every probed adapter met it: then the fewest
    parameters among the K that do."""
    if meets and any(meets.values()):
        return min((k for k in errors if meets[k]), key=lambda k: (params[k], k))
    return min(errors, key=lambda k: (errors[k] * params[k], params[k], k))


def captured(B: Tensor, A: Tensor, U: Tensor, V: Tensor, sq_norms: Tensor | None = None) -> Tensor:
    """||U^T W_i V||_F^2 / ||W_i||_F^2 per adapter (1 = the bases hold W_i entirely); B: (n, m, k), A: (n, k, d).

    Through k x k products only: ||(U^T B)(A V)||^2 = sum((B^T U U^T B) * (A V V^T A^T)). `sq_norms` (||W_i||^2,
    float64) may be passed when one module is scored against several clusters' bases."""
    C = project_left(U.to(B.dtype)[None], B[None])[0].double()  # (n, r, k) = U^T B_i
    Z = project_right(A[None], V.to(A.dtype)[None])[0].double()  # (n, k, r) = A_i V
    kept = ((C.mT @ C) * (Z @ Z.mT)).sum((-2, -1))
    norms = delta_sq_norms(B, A) if sq_norms is None else sq_norms
    return torch.where(norms > 0, kept / norms.clamp_min(1e-300), torch.ones_like(norms))


def adjusted_rand_index(a: list[int], b: list[int]) -> float:
    """Agreement of two partitions, 1 = identical up to renaming, about 0 = chance (Hubert and Arabie)."""
    from math import comb

    pairs: dict[tuple[int, int], int] = {}
    for x, y in zip(a, b):
        pairs[(x, y)] = pairs.get((x, y), 0) + 1
    rows: dict[int, int] = {}
    cols: dict[int, int] = {}
    for (x, y), c in pairs.items():
        rows[x] = rows.get(x, 0) + c
        cols[y] = cols.get(y, 0) + c
    index = sum(comb(c, 2) for c in pairs.values())
    sr, sc, total = sum(comb(c, 2) for c in rows.values()), sum(comb(c, 2) for c in cols.values()), comb(len(a), 2)
    expected = sr * sc / total if total else 0.0
    top = (sr + sc) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)
