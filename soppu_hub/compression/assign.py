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
from .stacks import stack_factors

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


def auto_k(
    adapters: list[LoraAdapter],
    modules: list[str],
    sig: torch.Tensor,
    device: torch.device,
    config,
    *,
    budget: float | None = None,
) -> dict:
    """--clusters auto: K clusters by k-means on the signatures for every K of k_candidates, each cluster fitted by
    JD on two probe modules and priced there. With --adapter-error, --target-error or --budget (full cores:
    config.priced) each K is priced as the compression will be (refine: shared rank per module, private
    directions): the smallest store meeting the target, or the lowest error within the probes' share of the
    budget. Otherwise by mean error and stored parameters at --rank (cluster.choose_k). Returns {"clusters": K,
    "scan": [{K, stored, mean_error}], "runner_up", "priced_by"}.

    Past AUTO_K_SAMPLE adapters the scan runs on a fixed-seed uniform sample of that many, the members' parameters
    scaled up to all n: the choice of K depends on the collection's structure, not its size, and the one-cluster fit
    of a thousand adapters alone cost more than the rest of the scan."""
    from .cluster import choose_k, kmeans

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
    priced = config.priced
    share = None
    if budget is not None:  # the probes' part of the budget, for the sample
        total = sum(a.lora_params for a in adapters)
        probe = sum(a.modules[name].rank * sum(a.modules[name].shape) for a in adapters for name in probes)
        share = budget * probe / total / scale
    rows = []
    for k in k_candidates(len(sample), priced):
        labels = kmeans(sig, k)
        row = _price(stacks, labels, k, config, scale, share) if priced else _score(stacks, labels, k, config, scale)
        if row is not None:
            rows.append(row)
    if not rows:  # no K fits the budget on the probes: one cluster, whose refine says the smallest store there is
        return {"clusters": 1, "scan": [], "runner_up": None, "priced_by": "error within --budget"}
    if priced:
        ranked = _rank(rows, by_error=config.budget is not None)
    else:
        k = choose_k(
            {r["K"]: r["mean_error"] for r in rows},
            {r["K"]: r["stored"] for r in rows},
            meets={r["K"]: r["meets"] for r in rows} if config.target_error is not None else None,
        )
        ranked = sorted(rows, key=lambda r: r["K"] != k)
    return {
        "clusters": ranked[0]["K"],
        "scan": rows,
        "runner_up": ranked[1] if len(ranked) > 1 else None,
        "priced_by": "error within --budget"
        if priced and config.budget is not None
        else "store at --adapter-error"
        if priced and config.adapter_error is not None
        else "store at --target-error"
        if priced
        else "mean error x stored parameters at --rank",
    }


TIE = 1e-3  # relative: mean errors this close are float noise (thread counts change the last bits), not a choice


def _rank(rows: list[dict], *, by_error: bool) -> list[dict]:
    """Priced rows best first: the smallest store (the lowest error within a --budget), and among rows equal on that,
    errors within TIE of the best count as equal and the fewest clusters wins. The same inputs then choose the same
    K on any machine: an exact comparison of float errors let one thread or two decide between K = 1 and K = 3."""

    def first(r: dict) -> float:
        return r["mean_error"] if by_error else r["stored"]

    out, left = [], list(rows)
    while left:
        lead = min(first(r) for r in left)
        tied = [r for r in left if (first(r) <= lead * (1 + TIE) + 1e-12 if by_error else first(r) == lead)]
        best = min(r["stored"] if by_error else r["mean_error"] for r in tied)
        near = [r for r in tied if (r["stored"] == best if by_error else r["mean_error"] <= best * (1 + TIE) + 1e-12)]
        pick = min(near, key=lambda r: r["K"])
        out.append(pick)
        left.remove(pick)
    return out


PRICED_K = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192)  # about x1.3 apart, then doubling


def k_candidates(n: int, priced: bool) -> list[int]:
    """K to try: 1 .. min(MAX_AUTO_K, n // 2); priced, PRICED_K up to n // 2 and n itself (singletons, which cost
    no fit). A priced choice stores nothing for a direction no cluster shares, so a split is only chosen when it
    pays, and a K between grid points prices within a few percent of its neighbours."""
    from .cluster import MAX_AUTO_K

    if priced:
        return sorted({k for k in PRICED_K if k <= max(1, n // 2)} | {n})
    return list(range(1, max(1, min(MAX_AUTO_K, n // 2)) + 1))


def _fits(stacks: dict, labels: torch.Tensor, k: int, config, *, priced: bool = False) -> list[tuple]:
    """JD of each cluster on each probe module: (name, cluster, member indices, (U, V) or the JDResult, B, A, ranks).
    `priced`: bases only, and none for a cluster of one (its own directions are cheaper kept private: j shared
    directions store j (m + d) + its core, j private ones j (m + d)), so singletons cost no JD at all."""
    out = []
    for name, (B, A, ranks) in stacks.items():
        for c in range(k):
            idx = (labels == c).nonzero().flatten()
            if idx.numel() == 0:
                continue
            on = idx.to(B.device)
            if priced and idx.numel() == 1 and not config.shared_only:
                fit = (B.new_zeros(B.shape[-2], 0), A.new_zeros(A.shape[-1], 0))
            else:
                res = joint_diagonalize(
                    B[:, on],
                    A[:, on],
                    config.rank,
                    method=config.method,
                    weights=config.weighting,
                    tol=1e-4,
                    max_iter=30,
                )
                fit = (res.U[0], res.V[0]) if priced else res
            out.append((name, c, idx.tolist(), fit, B[0, on], A[0, on], ranks[idx]))
    return out


def _score(stacks: dict, labels: torch.Tensor, k: int, config, scale: float) -> dict:
    """Mean relative error and stored parameters at --rank (cut to --target-error when given) on the probes."""
    total, stored, met, count = 0.0, 0.0, True, 0
    for _name, _c, idx, res, B, A, ranks in _fits(stacks, labels, k, config):
        rel = res.rel_errors[0].cpu().double()
        r = res.rank
        if config.target_error is not None:
            r, rel = leading_rank(res.dense_cores()[0].cpu().double(), res.sq_norms[0].cpu(), config.target_error)
            met = met and bool((rel <= config.target_error).all())
        stored += r * (B.shape[-2] + A.shape[-1]) + scale * sum(
            core_size(r, int(ranks[q]), config.method) for q in range(len(idx))
        )
        total += float(rel.sum())
        count += len(idx)
    return {"K": k, "stored": stored, "mean_error": total / max(count, 1), "meets": met}


def _price(stacks: dict, labels: torch.Tensor, k: int, config, scale: float, share: float | None) -> dict | None:
    """The probes compressed as refine will: each (cluster, module) table chosen by --target-error, or all of them
    within `share` of --budget (None when K cannot fit it). Members' stores scaled to all n."""
    from .allocate import by_adapter_error, by_budget, by_target
    from .refine import table_of

    tables = [
        table_of(B, A, ranks, U, V, c, name, idx, config.shared_only)[0]
        for name, c, idx, (U, V), B, A, ranks in _fits(stacks, labels, k, config, priced=True)
    ]
    if config.adapter_error is not None:
        choices = by_adapter_error(tables, config.adapter_error, int(labels.numel()))
    elif share is None:
        choices = [by_target(t, config.target_error) for t in tables]
    else:
        try:
            choices = by_budget(tables, share, int(labels.numel()), cap=config.max_adapter_error)[0]
        except ValueError:
            return None
    stored, errors = 0.0, []
    for t, ch in zip(tables, choices):
        shared = ch.rank * t.width
        stored += shared + scale * (ch.stored - shared)
        errors += [(e / nrm) ** 0.5 if nrm > 0 else 0.0 for e, nrm in zip(ch.sq_errors, t.sq_norms.tolist())]
    return {"K": k, "stored": stored, "mean_error": sum(errors) / max(len(errors), 1)}


def reassign(
    adapters: list[LoraAdapter], bundles: list[Bundle], labels: list[int], modules: list[str], device: torch.device
) -> list[int]:
    """Each adapter to the cluster whose bases capture most of it (mean of ||U^T W V||^2 / ||W||^2 over up to
    REASSIGN_MODULES positions spread over the model: reading every module of every adapter again cost as much as
    a fit at 1000 adapters, and a cluster's bases are fitted to all layers alike)."""
    from .cluster import captured, renumber

    n = len(adapters)
    score = torch.zeros(n, len(bundles), dtype=torch.float64)
    counted = torch.zeros(n, dtype=torch.float64)
    for name in modules[:: max(1, len(modules) // REASSIGN_MODULES)][:REASSIGN_MODULES]:
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
