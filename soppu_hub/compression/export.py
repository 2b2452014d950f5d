"""One adapter of a bundle as a standard PEFT LoRA, at a rank and dtype servers run exactly as compressed."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import ConfigError
from ..peft_format.config import clean_config
from ..peft_format.layout import (
    DEFAULT_LORAX_TP,
    LORAX_AUTO,
    LORAX_MAX_TP,
    lorax_exact_tps,
    lorax_rank,
    rank_pattern,
    written_ranks,
)
from ..peft_format.write import write_peft_folder
from .bundle import Bundle
from .quantize import FLOATS, STORE_DTYPES


def peft_factors(
    bundle: Bundle, adapter: int, rank: int | dict[str, int]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adapter i as float64 LoRA factors, of one uniform rank or of a rank per module: SVD of each core (with its
    private directions, of the whole delta), split evenly between B and A.

    Exact whenever a module's rank >= its rank(S_i) (see Bundle.module_ranks); the columns / rows beyond are zeros.
    """
    out = {}
    ranks = rank
    for name, mb in bundle.modules.items():
        if adapter not in mb.cores:
            continue
        rank = ranks[name] if isinstance(ranks, dict) else ranks
        if adapter in mb.private:
            out[name] = _split(*mb.delta_factors(adapter), rank)
            continue
        S = mb.core_matrix(adapter).double()
        P, sig, Qh = torch.linalg.svd(S)
        e = min(rank, sig.numel())
        root = sig[:e].sqrt()
        B = torch.zeros(mb.U.shape[0], rank, dtype=torch.float64)
        A = torch.zeros(rank, mb.V.shape[0], dtype=torch.float64)
        B[:, :e] = mb.U.double() @ (P[:, :e] * root)
        A[:e] = (root[:, None] * Qh[:e]) @ mb.V.double().T
        out[name] = (B, A)
    return out


def _split(L: torch.Tensor, R: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L @ R (shared part and private directions side by side) as `rank` float64 LoRA factors: the SVD of the
    product through the QR of each side, split evenly; exact whenever rank >= rank(L @ R)."""
    Q1, R1 = torch.linalg.qr(L.double())
    Q2, R2 = torch.linalg.qr(R.double().T)
    P, sig, Qh = torch.linalg.svd(R1 @ R2.T)
    e = min(rank, sig.numel())
    root = sig[:e].sqrt()
    B = torch.zeros(L.shape[0], rank, dtype=torch.float64)
    A = torch.zeros(rank, R.shape[1], dtype=torch.float64)
    B[:, :e] = Q1 @ (P[:, :e] * root)
    A[:e] = (root[:, None] * Qh[:e]) @ Q2.T
    return B, A


@dataclass
class ExportConfig:
    """How each adapter is written as a PEFT LoRA. Field metadata carries the CLI help."""

    pad: bool = field(
        default=True,
        metadata={
            "help": "set r to the rank LoRAX pads to, so LoRAX serves the export unchanged (--no-pad writes r as the "
            "largest module rank; LoRAX then pads it and serves the adapter too weak)"
        },
    )
    uniform: bool = field(
        default=False,
        metadata={
            "help": "write every module at the one rank r, zero-padded, instead of each at its own rank (PEFT's "
            "rank_pattern / alpha_pattern): for readers that ignore rank_pattern and need one shape, such as "
            "LoRAX without its SGMV kernels (DISABLE_SGMV=1) or PEFT older than 0.7",
            "flag": "--uniform-rank",
        },
    )
    lorax_tp: int | str = field(
        default=LORAX_AUTO,
        metadata={
            "help": "LoRAX tensor-parallel size (--num-shard) to pad for, so LoRAX serves the export at full strength "
            "there (its rank >= 8 x N): auto (default) pads for 2 where the base model's heads allow 2 shards, "
            "else for 1 (nothing padded for a size LoRAX refuses); N must be a size the base allows"
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of each export: auto (its own input's), float32, bfloat16 or float16",
            "choices": ("auto", *FLOATS),
            "flag": "--export-dtype",
        },
    )
    store: str = field(
        default="auto",
        metadata={
            "help": "how the shared-basis store (the bundle, a collection's bases, members' cores) is kept: auto (the "
            "inputs' dtype when they agree, else bfloat16), a float dtype, or group-wise codes: int8 (about 2x "
            "smaller than bfloat16), int4 or nf4 (about 3.8x); the cores are refit to quantized bases, and every "
            "export is written from what is stored",
            "choices": STORE_DTYPES,
            "flag": "--store-dtype",
        },
    )

    lorax_sizes: tuple[int, ...] | None = None  # --num-shard sizes the base allows (for_base); None: not known

    def validate(self) -> None:
        if self.lorax_tp != LORAX_AUTO and (
            not isinstance(self.lorax_tp, int) or not 1 <= self.lorax_tp <= LORAX_MAX_TP
        ):
            raise ConfigError(
                f"--lorax-tp must be auto or a tensor-parallel size from 1 to {LORAX_MAX_TP}, got {self.lorax_tp}"
            )
        if self.dtype != "auto" and self.dtype not in FLOATS:
            raise ConfigError(f"--export-dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.store not in STORE_DTYPES:
            raise ConfigError(f"--store-dtype must be one of {', '.join(STORE_DTYPES)}, got {self.store!r}")

    def for_base(self, sizes: tuple[int, ...] | None, base: str | None = None) -> ExportConfig:
        """This config with the size to pad for made concrete, given the --num-shard sizes LoRAX can run the base
        at (None: its config could not be read, and auto falls back to DEFAULT_LORAX_TP). Raises ConfigError for
        an explicit size the base cannot be sharded to."""
        if self.lorax_tp == LORAX_AUTO:
            tp = DEFAULT_LORAX_TP if sizes is None else max(s for s in sizes if s <= DEFAULT_LORAX_TP)
        else:
            tp = self.lorax_tp
            if sizes is not None and tp not in sizes:
                raise ConfigError(
                    f"--lorax-tp {tp}: LoRAX cannot shard {base or 'the base model'} to {tp} (its "
                    f"attention and KV heads do not divide by {tp}); the sizes it allows: "
                    f"{', '.join(map(str, sizes))} (or leave --lorax-tp auto)"
                )
        return replace(self, lorax_tp=tp, lorax_sizes=sizes)

    @property
    def pad_tp(self) -> int:
        """The size padded for: lorax_tp, or DEFAULT_LORAX_TP while auto is not resolved against a base."""
        return DEFAULT_LORAX_TP if self.lorax_tp == LORAX_AUTO else int(self.lorax_tp)

    def ranks_for(self, needed: dict[str, int]) -> tuple[int, dict[str, int]]:
        """(config r, the rank written per module) for an adapter whose modules need `needed`.

        r is what LoRAX pads the largest to (with pad); each module is written at the least rank >= its own that
        LoRAX pads to r at every size where a uniform rank r would be exact, so zeros are written only where a
        module's own rank would pad elsewhere (and where layout.written_ranks makes modules alike), and lora_alpha = r
        with alpha_pattern = rank_pattern keeps every module's scale 1 for readers that honour the patterns (PEFT,
        vLLM) and for LoRAX, which ignores them. One rank r for all with --uniform-rank, or where no rank_pattern
        can say the ranks."""
        top = max([1, *needed.values()])
        r = lorax_rank(top, self.pad_tp) if self.pad else top
        exact = lorax_exact_tps(r, sizes=self.lorax_sizes) if self.pad else ()
        written = None if self.uniform else written_ranks(needed, r, exact)
        return r, written if written is not None else dict.fromkeys(needed, r)

    def torch_dtype(self, inputs: torch.dtype) -> torch.dtype:
        """`inputs`: an input adapter's dtype (float64 is written as float32)."""
        if self.dtype != "auto":
            return FLOATS[self.dtype]
        return torch.float32 if inputs == torch.float64 else inputs


@dataclass
class ExportInfo:
    """What export_peft wrote for one adapter."""

    rank: int  # config r (what LoRAX pads to; modules may be written below it, per rank_pattern)
    unpadded_rank: int  # the largest rank a module's reconstruction needs
    dtype: torch.dtype
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (B, A) exactly as written; dropped once scored
    needed: dict[str, int]  # module -> the rank its reconstruction needs
    lora_params: int = 0
    padding_params: int = 0  # zeros written only so LoRAX runs the adapter unchanged
    ranks: tuple[int, ...] = ()  # the ranks its modules are written at, each once, ascending
    repo_bytes: int = 0  # tensor bytes of the whole output folder (export, carried tensors, its slice of the store)

    def __post_init__(self) -> None:
        self.lora_params = sum(B.numel() + A.numel() for B, A in self.factors.values())
        self.padding_params = sum(
            (A.shape[0] - min(self.needed[m], A.shape[0])) * (B.shape[0] + A.shape[1])
            for m, (B, A) in self.factors.items()
        )
        self.ranks = tuple(sorted({A.shape[0] for _, A in self.factors.values()} or {self.rank}))


def export_peft(
    bundle: Bundle,
    adapter: int,
    folder: str | Path,
    *,
    export: ExportConfig | None = None,
    dtype: torch.dtype = torch.float32,
    extras: dict[str, torch.Tensor] | None = None,
) -> ExportInfo:
    """Write adapter i as a standard PEFT LoRA that LoRAX, vLLM and PEFT load, each module at scale 1.

    Config r is what LoRAX pads to and each module is written at its own rank (rank_pattern / alpha_pattern), as
    `export` says (ExportConfig.ranks_for), so the delta is exactly U S_i V^T in PEFT, in vLLM and in LoRAX at the
    sizes the report names; `extras` (carried tensors, scaled lora_B biases) are written beside the factors.
    """
    export = export or ExportConfig()
    needed = bundle.module_ranks(adapter)
    rank, written = export.ranks_for(needed)
    factors = {n: (B.to(dtype), A.to(dtype)) for n, (B, A) in peft_factors(bundle, adapter, written).items()}
    pattern = rank_pattern(written, rank)
    config = clean_config(
        bundle.configs[adapter],
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        use_dora=False,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
    )
    kinds = {n: mb.kind for n, mb in bundle.modules.items()}
    write_peft_folder(folder, factors, config, kinds=kinds, extras=extras)
    return ExportInfo(rank, bundle.export_rank(adapter), dtype, factors, needed)
