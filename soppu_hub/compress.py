"""Plan a joint compression: check adapters agree, batch same-shaped modules, run the kernel, keep errors."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from .bundle import Bundle, ModuleBasis
from .errors import IncompatibleAdaptersError
from .jd import METHODS, factored_rel_error, joint_diagonalize, resolve_device
from .lora import LoraAdapter

Progress = Callable[[int, int], None]  # (modules done, modules total)

# Upper bound on factor elements per kernel call; larger groups are split along the layer axis.
MAX_BATCH_ELEMENTS = 1 << 26


@dataclass
class CompressConfig:
    """How to compress. Field metadata carries the help text the CLI shows."""

    rank: int = field(default=16, metadata={"help": "shared rank r of the bases U, V (not clipped to the LoRA rank)"})
    method: str = field(default="full", metadata={"help": "full: r x r core per adapter; diag: r values per adapter"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu or cuda"})
    weighting: str = field(default="norm", metadata={"help": "norm: w_i = 1/||W_i||^2 so small adapters are kept; none: unweighted"})
    tol: float = field(default=1e-6, metadata={"help": "stop when the objective changes by less than this, relatively"})
    max_iter: int = field(default=200, metadata={"help": "iteration cap per batch of modules"})

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"--rank must be a positive integer, got {self.rank}")
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.weighting not in ("norm", "none"):
            raise ValueError(f"--weighting must be norm or none, got {self.weighting!r}")


@dataclass
class ModuleStats:
    """Per-module outcome: relative error per adapter index, iterations of the batch it ran in."""

    rel_errors: dict[int, float]
    iterations: int
    converged: bool


@dataclass
class Compression:
    config: CompressConfig
    adapters: list[LoraAdapter]
    bundle: Bundle
    stats: dict[str, ModuleStats]
    device: str
    seconds: float

    @property
    def carried_params(self) -> int:
        """Tensors JD does not compress (heads, embeddings, biases): stored as they are, once per adapter."""
        return sum(a.carried_params for a in self.adapters)

    @property
    def params_before(self) -> int:
        return sum(a.num_params for a in self.adapters)

    @property
    def params_after(self) -> int:
        return self.bundle.num_params + self.carried_params


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
                    f"module {name} is {seen[0][0]}x{seen[0][1]} in {seen[1]} but {mod.shape[0]}x{mod.shape[1]} in {a.name}; "
                    "these adapters are not for the same architecture"
                )


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def compress(
    adapters: list[LoraAdapter], config: CompressConfig, *, progress: Progress | None = None
) -> Compression:
    """Compress adapters jointly. Modules with the same (shape, adapters present, max rank) run as one batch."""
    config.validate()
    if not adapters:
        raise ValueError("no adapters to compress")
    check_compatible(adapters)
    device = resolve_device(config.device)
    start = time.perf_counter()

    groups: dict[tuple, list[str]] = defaultdict(list)
    modules = sorted({m for a in adapters for m in a.modules}, key=_order_key(adapters))
    for name in modules:
        present = tuple(i for i, a in enumerate(adapters) if name in a.modules)
        first = adapters[present[0]].modules[name]
        kmax = max(adapters[i].modules[name].rank for i in present)
        groups[(first.shape, present, kmax)].append(name)

    bundle = Bundle(config.method, [a.name for a in adapters], [a.config for a in adapters])
    stats: dict[str, ModuleStats] = {}
    total, done = len(modules), 0
    for ((m, d), present, kmax), names in groups.items():
        per_layer = len(present) * kmax * (m + d)
        step = max(1, MAX_BATCH_ELEMENTS // per_layer)
        for lo in range(0, len(names), step):
            chunk = names[lo : lo + step]
            B, A = _stack(adapters, chunk, present, kmax, device)
            res = joint_diagonalize(
                B, A, config.rank, method=config.method, weights=config.weighting, tol=config.tol, max_iter=config.max_iter
            )
            U, V, cores, rel = res.U.cpu(), res.V.cpu(), res.cores.cpu(), res.rel_errors.cpu()
            for j, name in enumerate(chunk):
                bundle.modules[name] = ModuleBasis(
                    U[j].contiguous(), V[j].contiguous(), {i: cores[j, p].contiguous() for p, i in enumerate(present)},
                    adapters[present[0]].modules[name].kind,
                )
                stats[name] = ModuleStats({i: float(rel[j, p]) for p, i in enumerate(present)}, res.iterations, res.converged)
            done += len(chunk)
            if progress:
                progress(done, total)
    bundle.modules = {n: bundle.modules[n] for n in sorted(bundle.modules, key=_order_key(adapters))}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return Compression(config, adapters, bundle, stats, _device_label(device), seconds)


def written_rel_errors(adapter: LoraAdapter, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Relative error per module of factors as written (rounded to the export dtype) against the original."""
    return {name: factored_rel_error(mod.B, mod.A, *factors[name]) for name, mod in adapter.modules.items()}


def _order_key(adapters: list[LoraAdapter]) -> Callable[[str], int]:
    """Keep modules in the adapters' own (natural) order."""
    order: dict[str, int] = {}
    for a in adapters:
        for name in a.modules:
            order.setdefault(name, len(order))
    return lambda n: order[n]


def _stack(
    adapters: list[LoraAdapter], names: list[str], present: tuple[int, ...], kmax: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, n, m, kmax) and (L, n, kmax, d) factor stacks, zero-padded where an adapter's rank is lower."""
    first = adapters[present[0]].modules[names[0]]
    (m, d), L, n = first.shape, len(names), len(present)
    dtype = torch.float64 if any(adapters[i].modules[names[0]].A.dtype == torch.float64 for i in present) else torch.float32
    B = torch.zeros(L, n, m, kmax, dtype=dtype)
    A = torch.zeros(L, n, kmax, d, dtype=dtype)
    for j, name in enumerate(names):
        for p, i in enumerate(present):
            mod = adapters[i].modules[name]
            B[j, p, :, : mod.rank] = mod.B
            A[j, p, : mod.rank, :] = mod.A
    return B.to(device), A.to(device)
