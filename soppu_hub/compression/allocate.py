"""How much each cluster shares and each adapter keeps of its own, chosen by what it stores.

Pure torch, no I/O. For every cluster and module position a `Table` lists the options: the shared rank j (the
leading j directions of the cluster's bases, j = 0 included) and, per member, p private directions, with the
squared error each leaves (private.py) and the numbers each stores. Three ways to choose:

- `by_target(t)`: per table, the smallest store at which every member's relative error is <= t. j = 0 with every
  direction private is exact, so a choice always exists: the result is never larger than per-adapter SVD at the
  same error, and never larger than plain JD either (p = 0 is an option).
- `by_adapter_error(tables, t)`: about the smallest store at which every adapter's whole relative error is <= t,
  and at that store the lowest mean error (the default's choice).
- `by_budget(tables, budget)`: the lowest mean relative error over whole adapters within a store, by a Lagrange
  multiplier: each table minimises weighted squared error + lam * stored on its own, and lam is bisected until the
  total fits. Every table's choice is optimal for its lam, so the error-store trade is the same everywhere (the
  classic rate allocation); reweighting each adapter by its last error turns the sum of squares into the mean.
  With a worst-adapter cap, adapters above it are weighted up and the allocation runs again until none is (or the
  budget cannot do it).

Every member keeps at least one direction (j >= 1 or p_i >= 1) where its delta is not zero: a budget is never
met by dropping a module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
EXACT = 1e-10  # relative squared error counted as zero (float64 round-off of an exact fit)


@dataclass
class Table:
    """One cluster at one module position: errors and stores of every (j, p) option."""

    cluster: int
    module: str
    members: list[int]  # global adapter indices, in the cluster's local order
    ranks: list[int]  # candidate shared ranks j
    width: int  # m + d: numbers per basis column pair and per private direction
    core_sizes: Tensor  # (J, n) numbers stored for each member's core at j
    errors: Tensor  # (J, n, P + 1) float64 squared error with p = 0 .. P private directions (inf: not allowed)
    sq_norms: Tensor  # (n,) float64 ||W_i||^2 at this module

    def stored(self, j: int, p: Tensor) -> int:
        """Numbers stored at option (ranks[j], p): bases, cores, private factors."""
        return int(self.ranks[j] * self.width + self.core_sizes[j].sum() + p.sum() * self.width)


@dataclass
class Choice:
    """One table's pick: its shared rank, each member's private directions and squared error, the store."""

    rank: int  # shared rank j
    private: list[int]  # p_i per member
    sq_errors: list[float]  # per member
    stored: int


def make_table(
    cluster: int,
    module: str,
    members: list[int],
    ranks: list[int],
    width: int,
    core_sizes: Tensor,
    left: Tensor,
    sigma: Tensor,
    sq_norms: Tensor,
    caps: Tensor,
) -> Table:
    """left (J, n): ||R_i||^2 with no private direction; sigma (J, n, P): the residual's squared singular values;
    caps (n,): most private directions a member may keep (its LoRA rank)."""
    J, n, P = sigma.shape
    err = torch.cat([left.unsqueeze(-1), left.unsqueeze(-1) - sigma.cumsum(-1)], dim=-1).clamp_min(0)
    p = torch.arange(P + 1)
    err = torch.where(p.view(1, 1, -1) <= caps.view(1, -1, 1), err, torch.full_like(err, math.inf))
    if ranks[0] == 0:  # j = 0 keeps nothing shared: a member with a delta keeps at least one private direction
        err[0, :, 0] = torch.where(sq_norms > 0, torch.full_like(sq_norms, math.inf), err[0, :, 0])
    return Table(cluster, module, members, ranks, width, core_sizes, err, sq_norms.double())


def _fixed(table: Table) -> Tensor:
    """(J,) float64 numbers stored at each rank whatever the private directions: bases and cores."""
    return torch.tensor(table.ranks, dtype=torch.float64) * table.width + table.core_sizes.sum(-1)


def _choice(table: Table, j: int, p: Tensor) -> Choice:
    err = table.errors[j].gather(1, p[:, None]).squeeze(1)
    return Choice(table.ranks[j], p.tolist(), err.tolist(), table.stored(j, p))


def by_target(table: Table, target: float) -> Choice:
    """The smallest store where every member's relative error <= target (ties: the smaller total error)."""
    ok = table.errors <= ((target**2 + EXACT) * table.sq_norms)[None, :, None]  # (J, n, P + 1)
    p = ok.to(torch.int8).argmax(-1)  # per rank, each member's first p that meets it
    feasible = ok.any(-1).all(-1)  # (J,)
    if not bool(feasible.any()):  # only without j = 0 (--shared-only): the least error there is
        return _choice(table, len(table.ranks) - 1, table.errors[-1].min(-1).indices)
    stored = _fixed(table) + p.sum(-1).double() * table.width
    total = table.errors.gather(2, p.unsqueeze(-1)).squeeze(-1).sum(-1)
    stored = torch.where(feasible, stored, torch.full_like(stored, math.inf))
    j = min(range(len(table.ranks)), key=lambda q: (float(stored[q]), float(total[q])))
    return _choice(table, j, p[j])


class Batch:
    """Tables stacked by cluster and shape (same members, ranks and width), so choosing at a price costs a few
    tensor ops per group instead of per table: the budget and error searches run hundreds of prices."""

    def __init__(self, tables: list[Table], n: int) -> None:
        self.tables, self.n = tables, n
        groups: dict[tuple, list[int]] = {}
        for q, t in enumerate(tables):
            groups.setdefault((tuple(t.members), tuple(t.ranks), t.width, t.errors.shape[-1]), []).append(q)
        self.groups = []
        for (members, _, width, p1), idx in groups.items():
            errors = torch.stack([tables[q].errors for q in idx])  # (T, J, n, P + 1)
            fixed = torch.stack([_fixed(tables[q]) for q in idx])  # (T, J)
            steps = torch.arange(p1, dtype=torch.float64) * width
            self.groups.append((idx, torch.tensor(members), errors, fixed, steps, width))
        self.norms = adapter_norms(tables, n)
        self.no_shared = all(t.ranks[0] == 0 for t in tables)

    def uniform(self, budget: float) -> tuple[list, Tensor] | None:
        """Per-adapter truncated SVD as the user would run it: nothing shared (j = 0) and the same p private
        directions everywhere (a member's own rank where that is less), the largest p whose store fits; (picks,
        errors), None where nothing shared is not an option (--shared-only) or even p = 1 does not fit."""
        if not self.no_shared:
            return None
        for p in range(max(g[2].shape[-1] for g in self.groups) - 1, 0, -1):
            stored, sq, picks = 0.0, torch.zeros(self.n, dtype=torch.float64), []
            for idx, members, errors, fixed, _steps, width in self.groups:
                allowed = torch.isfinite(errors[:, 0]) & (torch.arange(errors.shape[-1]) <= p)  # (T, n, P + 1)
                pj = (allowed * torch.arange(errors.shape[-1])).amax(-1)  # (T, n): the most allowed, up to p
                stored += float((fixed[:, 0] + pj.sum(-1) * width).sum())
                sq.index_add_(0, members, errors[:, 0].gather(-1, pj.unsqueeze(-1)).squeeze(-1).sum(0))
                picks.append((idx, torch.zeros(len(idx), dtype=torch.long), pj))
            if stored <= budget:
                rel = torch.where(self.norms > 0, sq / self.norms.clamp_min(1e-300), torch.zeros_like(sq)).sqrt()
                return picks, rel
        return None

    def run(self, lam: float, weights: Tensor) -> tuple[float, Tensor, list]:
        """At price lam per number stored and weights (n,) per unit of squared error: the total store, each
        adapter's whole relative error, and the picks (for choices)."""
        stored, sq, picks = 0.0, torch.zeros(self.n, dtype=torch.float64), []
        for idx, members, errors, fixed, steps, width in self.groups:
            w = weights[members]
            per, p = (w[None, None, :, None] * errors + lam * steps).min(-1)  # (T, J, n): each member's best p
            j = (per.sum(-1) + lam * fixed).argmin(-1)  # (T,)
            rows = torch.arange(len(idx))
            pj = p[rows, j]  # (T, n)
            err = errors[rows, j].gather(-1, pj.unsqueeze(-1)).squeeze(-1)  # (T, n)
            stored += float((fixed[rows, j] + pj.sum(-1) * width).sum())
            sq.index_add_(0, members, err.sum(0))
            picks.append((idx, j, pj))
        rel = torch.where(self.norms > 0, sq / self.norms.clamp_min(1e-300), torch.zeros_like(sq)).sqrt()
        return stored, rel, picks

    def choices(self, picks: list) -> list[Choice]:
        out: list[Choice | None] = [None] * len(self.tables)
        for idx, j, pj in picks:
            for t, q in enumerate(idx):
                out[q] = _choice(self.tables[q], int(j[t]), pj[t])
        return out


def adapter_norms(tables: list[Table], n: int) -> Tensor:
    """(n,) ||W_i||^2 over all of an adapter's modules."""
    total = torch.zeros(n, dtype=torch.float64)
    for t in tables:
        total[t.members] += t.sq_norms
    return total


def adapter_errors(tables: list[Table], choices: list[Choice], norms: Tensor) -> Tensor:
    """(n,) whole-adapter relative errors of the choices."""
    err = torch.zeros_like(norms)
    for t, c in zip(tables, choices):
        err[t.members] += torch.tensor(c.sq_errors, dtype=torch.float64)
    return torch.where(norms > 0, err / norms.clamp_min(1e-300), torch.zeros_like(err)).sqrt()


def by_budget(
    tables: list[Table], budget: float, n: int, *, cap: float | None = None, rounds: int = 12, mean_rounds: int = 3
) -> tuple[list[Choice], float | None]:
    """The choices with the lowest mean relative error whose stores add up to <= budget; and the lam used (None:
    the uniform SVD won).

    `cap`: no adapter's whole relative error above it where the budget allows (a worst-adapter floor): adapters
    above it get more weight (their error over the cap, squared) and the allocation runs again, up to `rounds`
    times; once within the cap, the weakest power of that boost still within it is bisected for (its mean error
    is the lowest); the lowest mean within the cap wins, else the round with the lowest worst error.
    The multiplier minimises the sum of squared relative errors, not the mean relative error that users compare
    (an adapter the budget can keep exact counts for little there): `mean_rounds` reweighted runs (iteratively
    reweighted least squares, each adapter's weight over its last error) close that gap, and only improve the pick;
    they start from the multiplier's pick and from per-adapter truncated SVD at the largest uniform rank that fits,
    which is itself a candidate: at any budget the result is never behind that baseline.
    Raises ValueError (with the smallest store possible) when even the cheapest choice everywhere is larger."""
    smallest = sum(min(_cheapest(t)) for t in tables)
    if smallest > budget:
        raise ValueError(f"{smallest}")
    batch = Batch(tables, n)
    base = torch.where(batch.norms > 0, 1.0 / batch.norms.clamp_min(1e-300), torch.zeros_like(batch.norms))
    boost = torch.ones(n, dtype=torch.float64)
    best: tuple | None = None

    def consider(picks: list | None, err: Tensor, lam: float | None) -> bool:
        nonlocal best
        ok = cap is None or float(err.max()) <= cap
        key = (0, float(err.mean())) if ok else (1, float(err.max()))
        if best is None or key < best[0]:
            best = (key, picks, lam)
        return ok

    def attempt(weights: Tensor) -> tuple[bool, Tensor]:
        picks, err, lam = _fit_budget(batch, budget, weights)
        return consider(picks, err, lam), err

    for r in range(rounds if cap is not None else 1):  # noqa: B007 - r tells below whether a boost was needed
        ok, err = attempt(base * boost)
        if ok:
            break
        boost = torch.maximum(boost, boost * (err / cap).pow(2))
    weights = base * boost
    if cap is not None and ok and r > 0:  # the weakest boost^t still within the cap costs the mean least
        lo, hi = 0.0, 1.0
        for _ in range(6):
            t = (lo + hi) / 2
            lo, hi = (lo, t) if attempt(base * boost.pow(t))[0] else (t, hi)
        weights = base * boost.pow(hi)
        err = attempt(weights)[1]
    starts = [(weights, err)]
    uniform = batch.uniform(budget)
    if uniform is not None:  # the baseline itself is a candidate, and a start: the search never does worse than it
        consider(uniform[0], uniform[1], None)
        starts.append((base, uniform[1]))
    for weights, err in starts:
        for _ in range(mean_rounds):  # from the mean of squares to the mean: each adapter weighted by 1 / its error
            floor = max(float(err.mean()) * 0.05, 1e-4)
            err = attempt(weights / err.clamp_min(floor))[1]
    if best[1] is None:  # the cheapest by cost is not the cheapest by store (ties): the store minimum
        return [_choice(t, *_cheapest_option(t)) for t in tables], best[2]
    return batch.choices(best[1]), best[2]


def by_adapter_error(tables: list[Table], target: float, n: int, *, rounds: int = 24) -> list[Choice]:
    """About the smallest store at which every adapter's whole relative error is <= target, with the lowest mean
    error at that store: each table minimises stored + sum_i mu_i err_i / ||W_i||^2. A common price mu is bisected
    until the worst adapter meets the target; then each adapter's own price follows its error (down where it has
    room, up where it has not) while the total shrinks; last, the store found is handed to by_budget with the target
    as the cap, and the lower mean error of the two is kept."""
    batch = Batch(tables, n)
    base = torch.where(batch.norms > 0, 1.0 / batch.norms.clamp_min(1e-300), torch.zeros_like(batch.norms))

    def run(mu: Tensor) -> tuple[float, Tensor, list]:
        return batch.run(1.0, mu * base)

    lo, hi = -8.0, 14.0  # log10 of the price of a unit of relative squared error, in numbers stored
    for _ in range(36):
        mid = (lo + hi) / 2
        if float(run(torch.full((n,), 10**mid, dtype=torch.float64))[1].max()) <= target:
            hi = mid
        else:
            lo = mid
    mu = torch.full((n,), 10**hi, dtype=torch.float64)
    stored, err, best = run(mu)
    for _ in range(rounds):
        mu = mu * (err / target).pow(2).clamp(0.5, 2.0)
        total, err, picks = run(mu)
        if float(err.max()) <= target and total < stored:
            best, stored = picks, total
    chosen = batch.choices(best)
    mean = float(adapter_errors(tables, chosen, batch.norms).mean())
    budgeted, _ = by_budget(tables, stored, n, cap=target)
    err = adapter_errors(tables, budgeted, batch.norms)
    return budgeted if float(err.max()) <= target and float(err.mean()) < mean else chosen


def _fit_budget(batch: Batch, budget: float, weights: Tensor, iters: int = 32) -> tuple[list | None, Tensor, float]:
    """Bisect lam (log scale) for the largest store <= budget with these weights: (picks, errors, lam); picks None
    when even the highest price stores more (ties between options of equal cost)."""
    lo, hi = -30.0, 5.0  # log10 lam: at 1e5 per number stored every table takes its cheapest option
    total, err, best = batch.run(10**hi, weights)
    if total > budget:
        return None, err, 10**hi
    low_total, low_err, low = batch.run(10**lo, weights)
    if low_total <= budget:
        return low, low_err, 10**lo
    for _ in range(iters):
        mid = (lo + hi) / 2
        total, e, picks = batch.run(10**mid, weights)
        if total <= budget:
            hi, best, err = mid, picks, e
        else:
            lo = mid
    return best, err, 10**hi


def _cheapest(table: Table) -> list[float]:
    """The store of every rank's cheapest allowed option (inf where some member has none)."""
    out = []
    for j in range(len(table.ranks)):
        allowed = torch.isfinite(table.errors[j])
        p = allowed.to(torch.int8).argmax(-1)
        out.append(table.stored(j, p) if bool(allowed.any(-1).all()) else math.inf)
    return out


def _cheapest_option(table: Table) -> tuple[int, Tensor]:
    stores = _cheapest(table)
    j = min(range(len(stores)), key=stores.__getitem__)
    return j, torch.isfinite(table.errors[j]).to(torch.int8).argmax(-1)
