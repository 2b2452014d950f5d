"""Plan a joint compression: check adapters agree, split them into clusters, batch same-shaped modules per
cluster, run the kernel, reassign adapters to the cluster that reconstructs them best, keep errors."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError, IncompatibleAdaptersError
from ..peft_format.read import LoraAdapter, widest_dtype
from .assign import auto_k, reassign, signatures
from .bundle import Bundle, Core, ModuleBasis, compact_core
from .config import CompressConfig, budget_numbers, resolve_device
from .jd import joint_diagonalize, leading_rank
from .refine import Refined, refine
from .scoring import factored_rel_error
from .stacks import stack_factors

Progress = Callable[[int, int], None]  # (modules done, modules total)

# Upper bound on factor elements per kernel call; larger groups are split along the layer axis.
MAX_BATCH_ELEMENTS = 1 << 26


@dataclass
class ModuleStats:
    """Per-module outcome: relative error per adapter index, iterations of the batch it ran in."""

    rel_errors: dict[int, float]
    iterations: int
    converged: bool


@dataclass
class Compression:
    """The outcome: one Bundle per cluster (with its members' local order), each adapter's cluster, errors."""

    config: CompressConfig
    adapters: list[LoraAdapter]
    bundles: list[Bundle]
    cluster_of: list[int]  # adapter index -> cluster index
    stats: dict[str, ModuleStats]  # rel_errors keyed by global adapter index
    device: str
    seconds: float
    refined: Refined | None = None  # what --target-error / --budget chose (full cores)
    choice: dict | None = None  # --clusters auto: the K chosen, every K priced, the runner-up

    def local_indices(self) -> list[int]:
        """Each adapter's index inside its cluster's bundle (members keep their input order)."""
        seen: dict[int, int] = {}
        out = []
        for c in self.cluster_of:
            out.append(seen.get(c, 0))
            seen[c] = out[-1] + 1
        return out

    def members(self, c: int) -> list[int]:
        return [i for i, cj in enumerate(self.cluster_of) if cj == c]

    @property
    def carried_params(self) -> int:
        """Tensors JD does not compress (heads, embeddings, biases): stored as they are, once per adapter."""
        return sum(a.carried_params for a in self.adapters)

    @property
    def params_before(self) -> int:
        return sum(a.num_params for a in self.adapters)

    @property
    def params_after(self) -> int:
        return sum(b.num_params for b in self.bundles) + self.carried_params


def check_compatible(adapters: list[LoraAdapter]) -> None:
    """Adapters sharing a basis must target the same base model and agree on every module's shape."""
    bases = {a.base_model for a in adapters if a.base_model}
    if len(bases) > 1:
        detail = ", ".join(f"{a.name}: {a.base_model}" for a in adapters)
        raise IncompatibleAdaptersError(
            f"adapters were trained on different base models ({detail}); compress each base model's adapters separately"
        )
    carried = {tuple(a.carried_names): a.name for a in adapters}
    if len(carried) > 1:
        (mine, first), (theirs, second) = list(carried.items())[:2]
        diff = sorted(set(mine) ^ set(theirs))[0]
        raise IncompatibleAdaptersError(
            f"{first} and {second} carry different uncompressed tensors (e.g. {diff}: modules_to_save, saved "
            "embeddings or lora_bias); compress adapters with the same extra modules together"
        )
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for a in adapters:
        for name, mod in a.modules.items():
            seen = shapes.setdefault(name, (mod.shape, a.name))
            if seen[0] != mod.shape:
                raise IncompatibleAdaptersError(
                    f"module {name} is {seen[0][0]}x{seen[0][1]} in {seen[1]} but {mod.shape[0]}x{mod.shape[1]} in "
                    f"{a.name}; "
                    "these adapters are not for the same architecture"
                )


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def compress(adapters: list[LoraAdapter], config: CompressConfig, *, progress: Progress | None = None) -> Compression:
    """Compress adapters jointly, in clusters when asked. Modules with the same (shape, adapters present, max
    rank) run as one kernel batch."""
    config = config.for_inputs(len(adapters))
    config.validate(len(adapters))
    if not adapters:
        raise ValueError("no adapters to compress")
    check_compatible(adapters)
    device = resolve_device(config.device)
    start = time.perf_counter()
    order = _order_key(adapters)
    modules = sorted({m for a in adapters for m in a.modules}, key=order)

    labels = [0] * len(adapters)
    choice = None
    if config.clusters != "1":
        from .cluster import kmeans, normalise

        sig = normalise(signatures(adapters, modules))
        if config.clusters == "auto":
            choice = auto_k(adapters, modules, sig, device, config, budget=_budget(adapters, config))
            k = choice["clusters"]
        else:
            k = int(config.clusters)
        labels = kmeans(sig, k).tolist()
    tracker = _Progress(progress, len(modules))
    bundles, stats = _fit_all(adapters, labels, modules, config, device, tracker)
    for _ in range(REASSIGN_ROUNDS if len(bundles) > 1 else 0):
        new = reassign(adapters, bundles, labels, modules, device)
        if new == labels:
            break
        labels = new
        tracker.extra(len(modules))
        bundles, stats = _fit_all(adapters, labels, modules, config, device, tracker)
    refined = None
    if config.priced:
        refined = _refine(adapters, bundles, labels, stats, config)
    elif config.target_error is not None:
        for c, bundle in enumerate(bundles):
            _truncate_to_target(bundle, [i for i, lc in enumerate(labels) if lc == c], adapters, stats, config)
    for b in bundles:
        b.modules = {n: b.modules[n] for n in sorted(b.modules, key=order)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if progress:
        progress(tracker.total, tracker.total)  # shares of a module add up in floats: the bar ends at 100% exactly
    seconds = time.perf_counter() - start
    return Compression(config, adapters, bundles, labels, stats, _device_label(device), seconds, refined, choice)


REASSIGN_ROUNDS = 2  # "each adapter to the cluster that reconstructs it best", then refit; rarely needs more


class _Progress:
    """Module positions done over all clusters and refits, for one progress bar."""

    def __init__(self, progress: Progress | None, modules: int) -> None:
        self.progress, self.total, self.done = progress, modules, 0

    def extra(self, modules: int) -> None:
        self.total += modules

    def step(self, modules: int, share: float) -> None:
        self.done += modules * share
        if self.progress:
            self.progress(min(int(self.done), self.total), self.total)


def _fit_all(
    adapters: list[LoraAdapter],
    labels: list[int],
    modules: list[str],
    config: CompressConfig,
    device: torch.device,
    tracker: _Progress,
) -> tuple[list[Bundle], dict[str, ModuleStats]]:
    """One Bundle per cluster; stats merged with global adapter indices."""
    bundles, stats = [], {}
    n = len(adapters)
    for c in range(max(labels) + 1):
        members = [i for i, lc in enumerate(labels) if lc == c]
        share = len(members) / n
        bundle, st = _fit(adapters, members, modules, config, device, lambda done, s=share: tracker.step(done, s))
        bundles.append(bundle)
        for name, ms in st.items():
            if name in stats:
                stats[name].rel_errors.update(ms.rel_errors)
                stats[name].iterations = max(stats[name].iterations, ms.iterations)
                stats[name].converged = stats[name].converged and ms.converged
            else:
                stats[name] = ms
    return bundles, stats


def _fit(
    adapters: list[LoraAdapter],
    members: list[int],
    modules: list[str],
    config: CompressConfig,
    device: torch.device,
    step: Callable[[int], None],
) -> tuple[Bundle, dict[str, ModuleStats]]:
    """JD of the member adapters (global indices) into one Bundle whose adapter i is members[i]."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name in modules:
        present = tuple(p for p, i in enumerate(members) if name in adapters[i].modules)
        if not present:
            continue
        first = adapters[members[present[0]]].modules[name]
        kmax = max(adapters[members[p]].modules[name].rank for p in present)
        groups[(first.shape, present, kmax)].append(name)
    bundle = Bundle(config.method, [adapters[i].name for i in members], [adapters[i].config for i in members])
    stats: dict[str, ModuleStats] = {}
    for ((m, d), present, kmax), names in groups.items():
        per_layer = len(present) * kmax * (m + d)
        step_size = max(1, MAX_BATCH_ELEMENTS // per_layer)
        glob = tuple(members[p] for p in present)
        for lo in range(0, len(names), step_size):
            chunk = names[lo : lo + step_size]
            B, A = stack_factors(adapters, chunk, glob, kmax, device)
            res = joint_diagonalize(
                B,
                A,
                config.rank,
                method=config.method,
                weights=config.weighting,
                tol=config.tol,
                max_iter=config.max_iter,
            )
            U, V, cores, rel = res.U.cpu(), res.V.cpu(), res.cores.cpu(), res.rel_errors.cpu()
            factors = None if res.factors is None else (res.factors[0].cpu(), res.factors[1].cpu())
            for j, name in enumerate(chunk):
                bundle.modules[name] = ModuleBasis(
                    U[j].contiguous(),
                    V[j].contiguous(),
                    {
                        p: _core(cores, factors, j, q, adapters[glob[q]].modules[name].rank)
                        for q, p in enumerate(present)
                    },
                    adapters[glob[0]].modules[name].kind,
                )
                stats[name] = ModuleStats(
                    {i: float(rel[j, q]) for q, i in enumerate(glob)}, res.iterations, res.converged
                )
            step(len(chunk))
    return bundle, stats


def _core(cores: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None, j: int, q: int, k: int) -> Core:
    """Adapter q's core at module j: from its exact rank-k factors when those are smaller (JD-Full), else dense."""
    if factors is None:
        return cores[j, q].contiguous()
    return compact_core(factors[0][j, q, :, :k], factors[1][j, q, :k, :])


def _truncate_to_target(
    bundle: Bundle,
    members: list[int],
    adapters: list[LoraAdapter],
    stats: dict[str, ModuleStats],
    config: CompressConfig,
) -> None:
    """Per module: the smallest leading rank r' <= rank at which every member's error <= target (else the full rank)."""
    from .scoring import delta_sq_norms

    for name, mb in bundle.modules.items():
        local = sorted(mb.cores)
        norms = torch.stack([delta_sq_norms(*adapters[members[p]].modules[name].factors()) for p in local])
        cores = torch.stack([mb.core_matrix(p).double() for p in local])  # (n, r, r)
        j, rel = leading_rank(cores, norms, config.target_error)
        bundle.modules[name] = mb.leading(j)
        for q, p in enumerate(local):
            stats[name].rel_errors[members[p]] = float(rel[q])


def _budget(adapters: list[LoraAdapter], config: CompressConfig) -> float | None:
    """--budget as numbers the bundles may store (the carried tensors' share taken off)."""
    if config.budget is None:
        return None
    carried = sum(a.carried_params for a in adapters)
    return budget_numbers(config.budget, sum(a.num_params for a in adapters), _bytes_per_number(adapters)) - carried


def _bytes_per_number(adapters: list[LoraAdapter]) -> int:
    """Bytes of one written number: the inputs' widest dtype (float64 inputs are written as float32)."""
    width = widest_dtype(a.dtype for a in adapters)
    return 4 if width == torch.float64 else width.itemsize


def _refine(
    adapters: list[LoraAdapter],
    bundles: list[Bundle],
    labels: list[int],
    stats: dict[str, ModuleStats],
    config: CompressConfig,
) -> Refined:
    """refine.refine with the run's settings; a budget below the smallest store possible is one line saying it."""
    budget = _budget(adapters, config)
    rel = {name: ms.rel_errors for name, ms in stats.items()}
    try:
        return refine(
            adapters,
            bundles,
            labels,
            target=config.target_error,
            budget=budget,
            rel_errors=rel,
            shared_only=config.shared_only,
            cap=config.max_adapter_error,
            adapter_error=config.adapter_error,
        )
    except ValueError as e:
        raise _unmeetable(config, adapters, float(str(e))) from None


def _unmeetable(config: CompressConfig, adapters: list[LoraAdapter], smallest: float) -> ConfigError:
    """The one line for a --budget no choice fits: the smallest store possible in parameters, bytes and ratio."""
    total = smallest + sum(a.carried_params for a in adapters)
    size = _bytes_per_number(adapters)
    before = sum(a.num_params for a in adapters)
    return ConfigError(
        f"--budget {config.budget} is below the smallest store possible here: {int(total):,} parameters "
        f"({total * size / 1e6:.2f} MB, {before / total:.2f}x), "
        + (
            f"each of the {config.clusters} cluster(s) at shared rank 1 (--shared-only); raise --budget or "
            "use fewer clusters"
            if config.shared_only
            else "every adapter kept at one direction per module; raise --budget"
        )
    )


def written_rel_errors(adapter: LoraAdapter, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Relative error per module of factors as written (rounded to the export dtype) against the original."""
    return {name: factored_rel_error(*mod.factors(), *factors[name]) for name, mod in adapter.modules.items()}


def _order_key(adapters: list[LoraAdapter]) -> Callable[[str], int]:
    """Keep modules in the adapters' own (natural) order."""
    order: dict[str, int] = {}
    for a in adapters:
        for name in a.modules:
            order.setdefault(name, len(order))
    return lambda n: order[n]
