"""Which cluster each adapter joins, over real adapters: factor stacks, signatures, the choice of K, reassignment.

The math is in cluster.py (pure torch); this module reads the adapters' factors for it and runs the kernel on
probe modules, so plan.py only sequences the steps.
"""

from __future__ import annotations

import torch

from ..errors import IncompatibleAdaptersError
from ..peft_format.read import LoraAdapter
from .bundle import Bundle, core_size
from .jd import joint_diagonalize, leading_rank
from .scoring import delta_sq_norms

REASSIGN_MODULES = 8
AUTO_K_SAMPLE = 256


def probe_modules(adapters: list[LoraAdapter], modules: list[str], count: int = 4) -> list[str]:
    """Up to `count` module positions every adapter has, spread over the model, cheapest shapes first."""
    common = [m for m in modules if all(m in a.modules for a in adapters)]
    if not common:
        raise IncompatibleAdaptersError("--clusters needs module positions that every adapter adapts; these share none")
    step = max(1, len(common) // count)
    return common[::step][:count]


def signatures(adapters: list[LoraAdapter], modules: list[str], probes: list[str] | None = None) -> torch.Tensor:
    """(n, features) cluster.module_signature of every adapter over the probe modules (`probes`, else chosen here)."""
    from .cluster import module_signature

    parts = []
    for name in probes if probes is not None else probe_modules(adapters, modules):
        kmax = max(a.modules[name].rank for a in adapters)
        B, A = stack_factors(adapters, [name], tuple(range(len(adapters))), kmax, torch.device("cpu"))
        parts.append(module_signature(B[0], A[0]))
    return torch.cat(parts, dim=1)


def auto_k(adapters: list[LoraAdapter], modules: list[str], sig: torch.Tensor, device: torch.device, *, rank: int,
           method: str, weighting: str, target_error: float | None) -> int:
    """--clusters auto: for K = 1 .. min(16, n // 2) (n: adapters scanned), k-means on the signatures, then JD of each cluster on two probe
    modules, scored by mean relative error and stored parameters (truncated to --target-error when given);
    cluster.choose_k weighs the two.

    Past AUTO_K_SAMPLE adapters the scan runs on a fixed-seed uniform sample of that many, the cores' parameters
    scaled up to all n: the choice of K depends on the collection's structure, not its size, and the one-cluster fit
    of a thousand adapters alone cost more than the rest of the scan."""
    from .cluster import MAX_AUTO_K, choose_k, kmeans

    n = len(adapters)
    picked = list(range(n))
    if n > AUTO_K_SAMPLE:
        picked = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(0))[:AUTO_K_SAMPLE].tolist())
    sample, sig, scale = [adapters[i] for i in picked], sig[picked], n / len(picked)
    probes = probe_modules(sample, modules, count=2)
    stacks = {}
    for name in probes:
        kmax = max(a.modules[name].rank for a in sample)
        ranks = torch.tensor([a.modules[name].rank for a in sample])
        stacks[name] = (*stack_factors(sample, [name], tuple(range(len(sample))), kmax, device), ranks)
    errors: dict[int, float] = {}
    params: dict[int, float] = {}
    meets: dict[int, bool] = {}
    for k in range(1, max(1, min(MAX_AUTO_K, len(sample) // 2)) + 1):
        labels = kmeans(sig, k)
        total, stored, met = 0.0, 0.0, True
        for B, A, ranks in stacks.values():
            for c in range(k):
                idx = (labels == c).nonzero().flatten()
                if idx.numel() == 0:
                    continue
                on = idx.to(B.device)
                res = joint_diagonalize(B[:, on], A[:, on], rank, method=method, weights=weighting, tol=1e-4, max_iter=30)
                rel = res.rel_errors[0].cpu().double()
                r = res.rank
                if target_error is not None:
                    r, rel = leading_rank(res.dense_cores()[0].cpu().double(), res.sq_norms[0].cpu(), target_error)
                    met = met and bool((rel <= target_error).all())
                m, d = B.shape[-2], A.shape[-1]
                stored += r * (m + d) + scale * sum(core_size(r, int(ranks[i]), method) for i in idx.tolist())
                total += float(rel.sum())
        errors[k], params[k], meets[k] = total / (len(sample) * len(stacks)), stored, met
    return choose_k(errors, params, meets=meets if target_error is not None else None)


def reassign(adapters: list[LoraAdapter], bundles: list[Bundle], labels: list[int], modules: list[str],
             device: torch.device) -> list[int]:
    """Each adapter to the cluster whose bases capture most of it (mean of ||U^T W V||^2 / ||W||^2 over up to
    REASSIGN_MODULES positions spread over the model: reading every module of every adapter again cost as much as
    a fit at 1000 adapters, and a cluster's bases are fitted to all layers alike)."""
    from .cluster import captured, renumber

    n = len(adapters)
    score = torch.zeros(n, len(bundles), dtype=torch.float64)
    counted = torch.zeros(n, dtype=torch.float64)
    for name in modules[::max(1, len(modules) // REASSIGN_MODULES)][:REASSIGN_MODULES]:
        present = tuple(i for i in range(n) if name in adapters[i].modules)
        if any(name not in b.modules for b in bundles):
            continue
        kmax = max(adapters[i].modules[name].rank for i in present)
        B, A = stack_factors(adapters, [name], present, kmax, device)
        norms = delta_sq_norms(B[0], A[0])
        for c, b in enumerate(bundles):
            mb = b.modules[name]
            score[list(present), c] += captured(B[0], A[0], mb.U.to(device), mb.V.to(device), norms).cpu()
        counted[list(present)] += 1
    if not bool((counted > 0).all()):
        return labels
    return renumber(score.argmax(1)).tolist()


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
