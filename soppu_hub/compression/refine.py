"""After the fit: each cluster's shared rank per module and each adapter's private directions, chosen by store.

Wiring only: reads the members' factors again module by module, asks private.py for the residual spectra at
every candidate shared rank, allocate.py for the choice (--target-error: the smallest store meeting it per module;
--adapter-error: per whole adapter; --budget: the lowest error within it), and rewrites the bundles' modules with the
leading bases, the exact
cores and the private factors. Also used on probe modules by assign.auto_k to price every K the same way.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..memory import trim_heap
from ..peft_format.read import LoraAdapter
from .allocate import Choice, Table, by_adapter_error, by_budget, by_target, make_table
from .bundle import Bundle, ModuleBasis, compact_core, core_size
from .private import Coordinates, coordinates, private_factors, rank_grid, residual_spectra, shared_core
from .stacks import stack_factors


@dataclass
class Refined:
    """What the choice was: per adapter its private directions (sum over modules), the store of the bundles."""

    private: dict[int, int] = field(default_factory=dict)  # global adapter index -> private directions, all modules
    stored: int = 0
    lam: float | None = None  # the multiplier --budget settled on


def module_table(
    adapters: list[LoraAdapter],
    glob: list[int],
    name: str,
    U: torch.Tensor,
    V: torch.Tensor,
    cluster: int,
    shared_only: bool = False,
) -> tuple[Table, Coordinates]:
    """The options of one cluster at one module: members `glob` (global indices) on bases U (m, r), V (d, r);
    `shared_only`: no private direction and at least one shared one."""
    kmax = max(adapters[g].modules[name].rank for g in glob)
    B, A = stack_factors(adapters, [name], tuple(glob), kmax, torch.device("cpu"))
    ranks = torch.tensor([adapters[g].modules[name].rank for g in glob])
    return table_of(B[0], A[0], ranks, U, V, cluster, name, glob, shared_only)


def table_of(
    B: torch.Tensor,
    A: torch.Tensor,
    ranks: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    cluster: int,
    name: str,
    glob: list[int],
    shared_only: bool = False,
    grid: list[int] | None = None,
) -> tuple[Table, Coordinates]:
    """module_table from factor stacks B (n, m, k), A (n, k, d) and each member's LoRA rank (n,); `grid`: the shared
    ranks allowed (default: rank_grid; a joiner keeps the collection's whole bases)."""
    co = coordinates(B[None].cpu(), A[None].cpu(), U[None].cpu(), V[None].cpu())
    grid = grid or [j for j in rank_grid(U.shape[1]) if j or not shared_only or U.shape[1] == 0]
    left, sig = residual_spectra(co, grid, 2 * B.shape[-1])
    # W_i - U U^T W_i V V^T has rank <= 2 k_i: on bases that miss W_i (a joiner's), k_i directions may not be enough
    caps = torch.zeros_like(ranks) if shared_only else 2 * ranks
    sizes = torch.tensor([[core_size(j, int(k)) for k in ranks] for j in grid], dtype=torch.float64)
    m, d = U.shape[0], V.shape[0]
    return make_table(cluster, name, glob, grid, m + d, sizes, left[:, 0], sig[:, 0], co.sq_norms[0], caps), co


def apply_choice(mb: ModuleBasis, co: Coordinates, choice: Choice, dtype: torch.dtype) -> ModuleBasis:
    """The module as chosen: leading `choice.rank` bases, each member's exact core there, its private factors."""
    j, local = choice.rank, sorted(mb.cores)
    cores, private = {}, {}
    for q, p in enumerate(local):
        P, Q = shared_core(co, j, 0, q)
        cores[p] = compact_core(P.to(dtype), Q.to(dtype))
        if choice.private[q]:
            X, Y = private_factors(co, j, choice.private[q], 0, q)
            private[p] = (X.to(dtype).contiguous(), Y.to(dtype).contiguous())
    return ModuleBasis(mb.U[:, :j].contiguous(), mb.V[:, :j].contiguous(), cores, mb.kind, private)


def refine(
    adapters: list[LoraAdapter],
    bundles: list[Bundle],
    labels: list[int],
    *,
    target: float | None,
    budget: float | None,
    rel_errors: dict[str, dict[int, float]],
    shared_only: bool = False,
    cap: float | None = None,
    adapter_error: float | None = None,
) -> Refined:
    """Rewrite every bundle's modules as chosen (in place); `rel_errors[module][adapter]` gets the new errors.
    `budget`: numbers the bundles may store in all, `cap` the worst whole-adapter error wanted within it (allocate.
    by_budget); `adapter_error`: the whole-adapter error every adapter meets (allocate.by_adapter_error); else
    `target`, per module. ValueError(smallest store) when the budget is below the cheapest choice."""
    members = {c: [i for i, lc in enumerate(labels) if lc == c] for c in range(len(bundles))}

    def each():
        for c, bundle in enumerate(bundles):
            for name, mb in bundle.modules.items():
                glob = [members[c][q] for q in sorted(mb.cores)]
                yield c, name, mb, glob

    out = Refined()
    if budget is None and adapter_error is None:
        for c, name, mb, glob in each():
            table, co = module_table(adapters, glob, name, mb.U, mb.V, c, shared_only)
            _store(bundles[c], name, mb, co, table, by_target(table, target), rel_errors, out)
        return out
    tables, small = [], []
    for c, name, mb, glob in each():
        table, co = module_table(adapters, glob, name, mb.U, mb.V, c, shared_only)
        tables.append(table)
        trim_heap()
        small.append(dataclasses.replace(co, Ql=None, Qr=None))  # a thousand adapters' Q_i for every module would
    if adapter_error is not None:  # not fit in memory; the cores need only the small coordinates
        choices = by_adapter_error(tables, adapter_error, len(adapters))
    else:
        choices, out.lam = by_budget(tables, budget, len(adapters), cap=cap)
    for (c, name, mb, glob), table, choice, co in zip(each(), tables, choices, small):
        if any(choice.private):  # private factors need the whole coordinates: read this module again
            co = module_table(adapters, glob, name, mb.U, mb.V, c, shared_only)[1]
        _store(bundles[c], name, mb, co, table, choice, rel_errors, out)
        trim_heap()
    return out


def _store(
    bundle: Bundle,
    name: str,
    mb: ModuleBasis,
    co: Coordinates,
    table: Table,
    choice: Choice,
    rel_errors: dict[str, dict[int, float]],
    out: Refined,
) -> None:
    bundle.modules[name] = apply_choice(mb, co, choice, mb.U.dtype)
    out.stored += choice.stored
    for g, p, err, norm in zip(table.members, choice.private, choice.sq_errors, table.sq_norms.tolist()):
        rel_errors.setdefault(name, {})[g] = math.sqrt(max(err, 0.0) / norm) if norm > 0 else 0.0
        out.private[g] = out.private.get(g, 0) + p
