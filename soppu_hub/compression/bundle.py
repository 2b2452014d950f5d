"""The shared-basis bundle (U, V per module, cores per adapter): in memory, on disk, and as PEFT LoRA.

`write_peft_folder` is the one writer of PEFT adapter folders (exports, samples); `export_peft` turns one
adapter of a bundle into such a folder at a rank and dtype servers run exactly as compressed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import BundleError, ConfigError
from ..peft_format.layout import (
    BUNDLE_HEADER,
    BUNDLE_WEIGHTS,
    CONFIG_NAME,
    DEFAULT_LORAX_TP,
    KEY_PREFIX,
    SAFETENSORS_NAME,
    lorax_rank,
)
from ..peft_format.read import EMBEDDING, LINEAR, clean_config, module_scaling

FORMAT = "soppu-bundle"
VERSION = 1
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModuleBasis:
    """Shared bases of one module position and the cores of the adapters that adapt it."""

    U: torch.Tensor  # (out, r)
    V: torch.Tensor  # (in, r)
    cores: dict[int, torch.Tensor]  # adapter index -> (r, r) or (r,) for diag
    kind: str = LINEAR  # or "embedding": exported as lora_embedding_A / _B

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def core_matrix(self, i: int) -> torch.Tensor:
        c = self.cores[i]
        return torch.diag(c) if c.dim() == 1 else c

    @property
    def num_params(self) -> int:
        return self.U.numel() + self.V.numel() + sum(c.numel() for c in self.cores.values())

    def leading(self, j: int) -> "ModuleBasis":
        """The first j basis directions and the matching block of every core (JD orders them by weight)."""
        if j >= self.rank:
            return self
        return ModuleBasis(self.U[:, :j].contiguous(), self.V[:, :j].contiguous(),
                           {p: (c[:j] if c.dim() == 1 else c[:j, :j]).contiguous() for p, c in self.cores.items()}, self.kind)


@dataclass
class Bundle:
    """Adapters compressed together. `adapters[i]` names adapter i; `configs[i]` is its original PEFT config."""

    method: str
    adapters: list[str]
    configs: list[dict]
    modules: dict[str, ModuleBasis] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(mb.num_params for mb in self.modules.values())

    def index(self, name: str) -> int:
        try:
            return self.adapters.index(name)
        except ValueError:
            raise BundleError(f"adapter {name!r} is not in this bundle (it holds {', '.join(self.adapters)})") from None

    def basis_id(self) -> str:
        """Content hash of the shared bases: adapters with the same id can share one resident basis."""
        h = hashlib.sha256()
        for name in sorted(self.modules):
            mb = self.modules[name]
            h.update(name.encode())
            h.update(mb.U.contiguous().float().numpy().tobytes())
            h.update(mb.V.contiguous().float().numpy().tobytes())
        return h.hexdigest()[:16]

    def truncated(self, rank: int) -> "Bundle":
        """Every module cut to its leading `rank` directions: the same fit at a smaller shared rank."""
        return Bundle(self.method, self.adapters, self.configs, {n: mb.leading(rank) for n, mb in self.modules.items()})

    def factors(self, adapter: int | str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Reconstruction of one adapter as (B, A) per module, delta = B @ A = U S_i V^T."""
        i = self.index(adapter) if isinstance(adapter, str) else adapter
        return {
            name: (mb.U @ mb.core_matrix(i), mb.V.T.contiguous())
            for name, mb in self.modules.items()
            if i in mb.cores
        }

    def subset(self, adapter: int | str) -> "Bundle":
        """The shared bases plus one adapter's cores: what one pushed repo carries."""
        i = self.index(adapter) if isinstance(adapter, str) else adapter
        mods = {n: ModuleBasis(mb.U, mb.V, {0: mb.cores[i]}, mb.kind) for n, mb in self.modules.items() if i in mb.cores}
        return Bundle(self.method, [self.adapters[i]], [self.configs[i]], mods)

    def export_rank(self, adapter: int) -> int:
        """Uniform LoRA rank that holds adapter i's reconstruction exactly in every module.

        JD-Full: rank(U S_i V^T) <= min(k_i, r), with k_i the module's original LoRA rank.
        JD-Diag: up to r.
        """
        ranks = [
            mb.rank if self.method == "diag" else min(mb.rank, module_scaling(self.configs[adapter], name)[0])
            for name, mb in self.modules.items()
            if adapter in mb.cores
        ]
        return max(ranks, default=1)

    def to(self, dtype: torch.dtype) -> "Bundle":
        """The same bundle with every tensor in `dtype` (what gets written)."""
        mods = {n: ModuleBasis(mb.U.to(dtype), mb.V.to(dtype), {i: c.to(dtype) for i, c in mb.cores.items()}, mb.kind)
                for n, mb in self.modules.items()}
        return Bundle(self.method, self.adapters, self.configs, mods)


def save_bundle(bundle: Bundle, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for name, mb in bundle.modules.items():
        tensors[f"{name}.U"] = mb.U.contiguous()
        tensors[f"{name}.V"] = mb.V.contiguous()
        order = sorted(mb.cores)
        tensors[f"{name}.cores"] = torch.stack([mb.cores[i] for i in order]).contiguous()
        modules[name] = {"rank": mb.rank, "adapters": order, "kind": mb.kind}
    header = {
        "format": FORMAT,
        "version": VERSION,
        "method": bundle.method,
        "basis_id": bundle.basis_id(),
        "adapters": [{"index": i, "name": n, "peft_config": c} for i, (n, c) in enumerate(zip(bundle.adapters, bundle.configs))],
        "modules": modules,
    }
    save_file(tensors, str(folder / BUNDLE_WEIGHTS), metadata={"format": FORMAT})  # one key: safetensors writes a map in
    # no fixed order, and byte-identical files are how a rerun knows a repo is unchanged (version: bundle.json)
    (folder / BUNDLE_HEADER).write_text(json.dumps(header, indent=2))


def load_bundle(folder: str | Path) -> Bundle:
    folder = Path(folder)
    try:
        header = json.loads((folder / BUNDLE_HEADER).read_text())
        tensors = load_file(str(folder / BUNDLE_WEIGHTS))
    except FileNotFoundError:
        missing = next(n for n in (BUNDLE_HEADER, BUNDLE_WEIGHTS) if not (folder / n).is_file())
        raise BundleError(f"{folder} is not a soppu bundle (missing {missing}); point at the bundle folder") from None
    except Exception as e:
        raise BundleError(f"{folder}: bundle cannot be read ({type(e).__name__}: {e}); download it again") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise BundleError(f"{folder}: not a {FORMAT} v{VERSION} bundle; upgrade soppu-hub")
    try:
        adapters = sorted(header["adapters"], key=lambda a: a["index"])
        bundle = Bundle(header["method"], [a["name"] for a in adapters], [a["peft_config"] for a in adapters])
        modules = header["modules"].items()
    except (KeyError, TypeError, AttributeError):
        raise BundleError(f"{folder}: {BUNDLE_HEADER} is incomplete; download or write the bundle again") from None
    for name, meta in modules:
        try:
            cores = tensors[f"{name}.cores"]
            mb = ModuleBasis(tensors[f"{name}.U"], tensors[f"{name}.V"], {i: cores[j] for j, i in enumerate(meta["adapters"])},
                             meta.get("kind", LINEAR))
        except (KeyError, IndexError, TypeError):
            raise BundleError(f"{folder}: tensors for module {name} are missing; the bundle is incomplete") from None
        r = mb.rank
        if mb.V.shape[1] != r or any(c.shape not in ((r, r), (r,)) for c in mb.cores.values()):
            raise BundleError(f"{folder}: module {name} has bases of rank {r} and {mb.V.shape[1]} and cores of shape "
                              f"{tuple(cores.shape[1:])}; the bundle is corrupt, write it again")
        bundle.modules[name] = mb
    return bundle


def peft_factors(bundle: Bundle, adapter: int, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adapter i as float64 LoRA factors of one uniform rank: SVD of each core, split evenly between B and A.

    Exact whenever `rank` >= rank(S_i) (see export_rank); the columns / rows beyond are zeros.
    """
    out = {}
    for name, mb in bundle.modules.items():
        if adapter not in mb.cores:
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


@dataclass
class ExportConfig:
    """How each adapter is written as a PEFT LoRA. Field metadata carries the CLI help."""

    pad: bool = field(default=True, metadata={"help": "pad the rank with zeros to what LoRAX runs unchanged (--no-pad "
                                                      "writes the bare rank; LoRAX then pads it and serves the adapter too weak)"})
    lorax_tp: int = field(default=DEFAULT_LORAX_TP, metadata={
        "help": "LoRAX tensor-parallel size (--num-shard) to pad for: the export is exact at N and below (rank >= 8 x N)"})
    dtype: str = field(default="auto", metadata={"help": "dtype of written tensors: auto (the inputs'; mixed -> the widest), "
                                                         "float32, bfloat16 or float16",
                                                 "choices": ("auto", *EXPORT_DTYPES), "flag": "--export-dtype"})

    def validate(self) -> None:
        if not isinstance(self.lorax_tp, int) or self.lorax_tp < 1:
            raise ConfigError(f"--lorax-tp must be a positive integer (LoRAX's tensor-parallel size), got {self.lorax_tp}")
        if self.dtype != "auto" and self.dtype not in EXPORT_DTYPES:
            raise ConfigError(f"--export-dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")

    def rank_for(self, rank: int) -> int:
        """The rank written for an adapter whose reconstruction needs `rank`."""
        return lorax_rank(rank, self.lorax_tp) if self.pad else rank

    def torch_dtype(self, inputs: torch.dtype) -> torch.dtype:
        """`inputs`: the widest dtype of the input adapters (float64 inputs are written as float32)."""
        if self.dtype != "auto":
            return EXPORT_DTYPES[self.dtype]
        return torch.float32 if inputs == torch.float64 else inputs


@dataclass
class ExportInfo:
    """What export_peft wrote for one adapter."""

    rank: int  # rank written (padded)
    unpadded_rank: int  # rank the reconstruction needs
    dtype: torch.dtype
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (B, A) exactly as written; dropped once scored
    lora_params: int = 0
    padding_params: int = 0  # zeros written only so LoRAX runs the adapter unchanged

    def __post_init__(self) -> None:
        self.lora_params = sum(B.numel() + A.numel() for B, A in self.factors.values())
        self.padding_params = (self.rank - self.unpadded_rank) * sum(B.shape[0] + A.shape[1] for B, A in self.factors.values())


def write_peft_folder(folder: str | Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], config: dict, *,
                      kinds: dict[str, str] | None = None, extras: dict[str, torch.Tensor] | None = None) -> Path:
    """A PEFT LoRA folder: factors (B, A) under PEFT's keys, `extras` under their own keys, `config` as is."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = dict(extras or {})
    for name, (B, A) in factors.items():
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if (kinds or {}).get(name) == EMBEDDING else \
            ("lora_A.weight", "lora_B.weight")
        tensors[f"{KEY_PREFIX}{name}.{a_key}"] = A.contiguous()
        tensors[f"{KEY_PREFIX}{name}.{b_key}"] = B.contiguous()
    save_file(tensors, str(folder / SAFETENSORS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def export_peft(bundle: Bundle, adapter: int, folder: str | Path, *, export: ExportConfig | None = None,
                dtype: torch.dtype = torch.float32, extras: dict[str, torch.Tensor] | None = None) -> ExportInfo:
    """Write adapter i as a standard PEFT LoRA (one uniform r, lora_alpha = r) that LoRAX, vLLM and PEFT load.

    The rank is padded with zeros as `export` says, so the delta is exactly U S_i V^T at any LoRAX setting;
    `extras` (carried tensors, scaled lora_B biases) are written beside the factors.
    """
    export = export or ExportConfig()
    unpadded = bundle.export_rank(adapter)
    rank = export.rank_for(unpadded)
    factors = {n: (B.to(dtype), A.to(dtype)) for n, (B, A) in peft_factors(bundle, adapter, rank).items()}
    config = clean_config(bundle.configs[adapter], r=rank, lora_alpha=rank, use_rslora=False, use_dora=False,
                          rank_pattern={}, alpha_pattern={})
    kinds = {n: mb.kind for n, mb in bundle.modules.items()}
    write_peft_folder(folder, factors, config, kinds=kinds, extras=extras)
    return ExportInfo(rank, unpadded, dtype, factors)
