"""How to compress: the settings (CompressConfig), their defaults, --budget read as a store, the device."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .jd import METHODS, WEIGHTINGS

# The CLI's default for several adapters: clusters auto and this whole-adapter relative error (issue 33: on the real
# collection it stores less than per-adapter SVD at rank 2 with a lower mean and worst error; docs/never-behind.md)
DEFAULT_ADAPTER_ERROR = 0.35
DEFAULT_RANK = 16  # the shared rank at most, when --rank is not given


@dataclass
class CompressConfig:
    """How to compress. Field metadata carries the help text the CLI shows."""

    rank: int | None = field(
        default=None,
        metadata={
            "type": int,
            "help": f"shared rank r of the bases U, V, at most (not clipped to the LoRA rank; default "
            f"{DEFAULT_RANK}); given without --clusters, several adapters share one cluster at this rank",
        },
    )
    method: str = field(
        default="full",
        metadata={"help": "full: r x r core per adapter; diag: r values per adapter", "choices": METHODS},
    )
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu or cuda"})
    weighting: str = field(
        default="norm",
        metadata={
            "help": "norm: w_i = 1/||W_i||^2 so small adapters are kept; none: unweighted",
            "choices": WEIGHTINGS,
        },
    )
    tol: float = field(default=1e-6, metadata={"help": "stop when the objective changes by less than this, relatively"})
    max_iter: int = field(default=200, metadata={"help": "iteration cap per batch of modules"})
    clusters: str = field(
        default="default",
        metadata={
            "help": "K: adapters split into K clusters, each with its own bases per module; auto: every K from 1 to "
            "the "
            "number of adapters priced as the compression will be (with --adapter-error, --target-error or "
            "--budget), else by probe error x stored parameters; default: several adapters auto (at --adapter-error "
            f"{DEFAULT_ADAPTER_ERROR} unless another target or a budget is given), but 1 when --rank is given"
        },
    )
    target_error: float | None = field(
        default=None,
        metadata={
            "type": float,
            "help": "the smallest store (shared rank per cluster and module, private directions per "
            "adapter) at which every module of every adapter has a relative error <= this "
            "(--method diag: the shared rank only); in (0, 1)",
        },
    )
    adapter_error: float | None = field(
        default=None,
        metadata={
            "type": float,
            "help": "about the smallest store at which every adapter's whole relative error is <= this, "
            "and the lowest mean error at that store; in (0, 1)",
        },
    )
    budget: str | None = field(
        default=None,
        metadata={
            "help": "the most the compressed adapters may store, carried tensors included: parameters (1200000, 3.5M), "
            "bytes of the written dtype (12MB, 8MiB) or a ratio to the originals (6x); the lowest error within it, "
            "with each cluster's rank per module and each adapter's private directions chosen to fit"
        },
    )
    shared_only: bool = field(
        default=False,
        metadata={
            "help": "no private directions: with --adapter-error, --target-error or --budget every adapter is kept "
            "only "
            "through its "
            "cluster's shared bases (JD as in the paper)"
        },
    )
    max_adapter_error: float = field(
        default=0.9,
        metadata={
            "help": "an adapter whose mean relative error is above this is named in the report and the terminal with "
            "the ways on (a cluster of its own, a larger rank): its directions are not in the shared bases"
        },
    )

    def validate(self, n_adapters: int | None = None) -> None:
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"--rank must be a positive integer, got {self.rank}")
        if self.clusters not in ("auto", "default") and not (str(self.clusters).isdigit() and int(self.clusters) >= 1):
            raise ConfigError(f"--clusters must be a positive integer or auto, got {self.clusters!r}")
        if n_adapters is not None and self.clusters not in ("auto", "default") and int(self.clusters) > n_adapters:
            raise ConfigError(
                f"--clusters {self.clusters} is more than the {n_adapters} adapters given; "
                f"use at most {n_adapters} or auto"
            )
        if not self.max_adapter_error > 0:
            raise ConfigError(f"--max-adapter-error must be positive (a relative error), got {self.max_adapter_error}")
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"--weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.target_error is not None and not 0 < self.target_error < 1:
            raise ConfigError(f"--target-error must be between 0 and 1 (a relative error), got {self.target_error}")
        if self.adapter_error is not None and not 0 < self.adapter_error < 1:
            raise ConfigError(f"--adapter-error must be between 0 and 1 (a relative error), got {self.adapter_error}")
        if self.budget is not None:
            parse_budget(self.budget)
        given = [
            f
            for f, v in (
                ("--budget", self.budget),
                ("--target-error", self.target_error),
                ("--adapter-error", self.adapter_error),
            )
            if v is not None
        ]
        if len(given) > 1:
            raise ConfigError(
                f"{' and '.join(given)} contradict each other (each one chooses the store on its own); give one of them"
            )
        if (self.budget is not None or self.adapter_error is not None) and self.method != "full":
            raise ConfigError(f"{given[0]} needs --method full (it chooses ranks and private directions of full cores)")

    @property
    def priced(self) -> bool:
        """Whether ranks and private directions are chosen by store (full cores and a target or a budget)."""
        return self.method == "full" and any(
            v is not None for v in (self.target_error, self.budget, self.adapter_error)
        )

    def for_inputs(self, n: int) -> CompressConfig:
        """The settings for n adapters, defaults made concrete: rank None is DEFAULT_RANK; clusters "default" is 1
        for one adapter or with --rank given, else auto, at --adapter-error DEFAULT_ADAPTER_ERROR when no other
        target or budget was given (the cost-aware search: never behind per-adapter SVD, issue 33)."""
        import dataclasses

        rank = DEFAULT_RANK if self.rank is None else self.rank
        if self.clusters != "default":
            return dataclasses.replace(self, rank=rank)
        if n < 2 or self.rank is not None:
            return dataclasses.replace(self, clusters="1", rank=rank)
        none = self.target_error is None and self.budget is None and self.adapter_error is None
        return dataclasses.replace(
            self, clusters="auto", rank=rank, adapter_error=DEFAULT_ADAPTER_ERROR if none else self.adapter_error
        )


_SCALE = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}


def parse_budget(text: str) -> tuple[str, float]:
    """--budget as ("params" | "bytes" | "ratio", value): '1200000', '3.5M' (parameters), '12MB', '8MiB' (bytes),
    '6x' (fewer stored parameters than the originals by this factor)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]i?)?\s*([Bx])?\s*", str(text), flags=re.IGNORECASE)
    bad = ConfigError(
        f"--budget {text!r} is not a store: give parameters (1200000, 3.5M), bytes (12MB, 8MiB) or a "
        "ratio to the originals (6x)"
    )
    if m is None or float(m.group(1)) <= 0:
        raise bad
    value, scale, unit = float(m.group(1)), (m.group(2) or "").upper(), (m.group(3) or "").lower()
    if unit == "x":
        if scale or value < 1:
            raise bad
        return "ratio", value
    return ("bytes" if unit == "b" else "params"), value * _SCALE[scale]


def budget_numbers(text: str, params_before: int, bytes_per_number: int) -> float:
    """--budget as the numbers (parameters) the compressed adapters may store, carried tensors included."""
    kind, value = parse_budget(text)
    if kind == "ratio":
        return params_before / value
    return value / bytes_per_number if kind == "bytes" else value


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device auto or cpu")
    return torch.device(device)
