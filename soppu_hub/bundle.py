"""The shared-basis bundle (U, V per module, cores per adapter): in memory, on disk, and as PEFT LoRA."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import BundleError
from .lora import CONFIG_NAME, KEY_PREFIX, SAFETENSORS_NAME, module_scaling

BUNDLE_WEIGHTS = "bundle.safetensors"
BUNDLE_HEADER = "bundle.json"
FORMAT = "soppu-bundle"
VERSION = 1


@dataclass
class ModuleBasis:
    """Shared bases of one module position and the cores of the adapters that adapt it."""

    U: torch.Tensor  # (out, r)
    V: torch.Tensor  # (in, r)
    cores: dict[int, torch.Tensor]  # adapter index -> (r, r) or (r,) for diag

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def core_matrix(self, i: int) -> torch.Tensor:
        c = self.cores[i]
        return torch.diag(c) if c.dim() == 1 else c

    @property
    def num_params(self) -> int:
        return self.U.numel() + self.V.numel() + sum(c.numel() for c in self.cores.values())


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
        mods = {n: ModuleBasis(mb.U, mb.V, {0: mb.cores[i]}) for n, mb in self.modules.items() if i in mb.cores}
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
        modules[name] = {"rank": mb.rank, "adapters": order}
    header = {
        "format": FORMAT,
        "version": VERSION,
        "method": bundle.method,
        "basis_id": bundle.basis_id(),
        "adapters": [{"index": i, "name": n, "peft_config": c} for i, (n, c) in enumerate(zip(bundle.adapters, bundle.configs))],
        "modules": modules,
    }
    save_file(tensors, str(folder / BUNDLE_WEIGHTS), metadata={"format": FORMAT, "version": str(VERSION)})
    (folder / BUNDLE_HEADER).write_text(json.dumps(header, indent=2))


def load_bundle(folder: str | Path) -> Bundle:
    folder = Path(folder)
    try:
        header = json.loads((folder / BUNDLE_HEADER).read_text())
        tensors = load_file(str(folder / BUNDLE_WEIGHTS))
    except FileNotFoundError as e:
        raise BundleError(f"{folder} is not a soppu bundle (missing {Path(e.filename).name}); point at the bundle folder") from None
    except Exception as e:
        raise BundleError(f"{folder}: bundle cannot be read ({type(e).__name__}: {e}); download it again") from None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise BundleError(f"{folder}: not a {FORMAT} v{VERSION} bundle; upgrade soppu-hub")
    adapters = sorted(header["adapters"], key=lambda a: a["index"])
    bundle = Bundle(header["method"], [a["name"] for a in adapters], [a["peft_config"] for a in adapters])
    for name, meta in header["modules"].items():
        try:
            cores = tensors[f"{name}.cores"]
            bundle.modules[name] = ModuleBasis(
                tensors[f"{name}.U"], tensors[f"{name}.V"], {i: cores[j] for j, i in enumerate(meta["adapters"])}
            )
        except (KeyError, IndexError):
            raise BundleError(f"{folder}: tensors for module {name} are missing; the bundle is incomplete") from None
    return bundle


def peft_factors(bundle: Bundle, adapter: int, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adapter i as LoRA factors of one uniform rank: SVD of each core, split evenly between B and A.

    Exact whenever `rank` >= rank(S_i) (see export_rank); zero-padded where a module needs less.
    """
    out = {}
    for name, mb in bundle.modules.items():
        if adapter not in mb.cores:
            continue
        S = mb.core_matrix(adapter).double()
        P, sig, Qh = torch.linalg.svd(S)
        e = min(rank, sig.numel())
        root = sig[:e].sqrt()
        B = mb.U.double() @ (P[:, :e] * root)
        A = (root[:, None] * Qh[:e]) @ mb.V.double().T
        if e < rank:
            B = torch.cat([B, B.new_zeros(B.shape[0], rank - e)], dim=1)
            A = torch.cat([A, A.new_zeros(rank - e, A.shape[1])], dim=0)
        out[name] = (B.float().contiguous(), A.float().contiguous())
    return out


def export_peft(bundle: Bundle, adapter: int, folder: str | Path, *, rank: int | None = None) -> int:
    """Write adapter i as a standard PEFT LoRA (one uniform r, scaling 1) that LoRAX, vLLM and PEFT load.

    Returns the rank written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rank = rank or bundle.export_rank(adapter)
    tensors = {}
    for name, (B, A) in peft_factors(bundle, adapter, rank).items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = B
    config = dict(bundle.configs[adapter])
    config.update(r=rank, lora_alpha=rank, use_rslora=False, use_dora=False, rank_pattern={}, alpha_pattern={})
    save_file(tensors, str(folder / SAFETENSORS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return rank
