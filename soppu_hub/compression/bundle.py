"""The shared-basis bundle (U, V per module, cores per adapter): in memory and on disk (safetensors + JSON)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import BundleError
from ..peft_format.layout import (
    BUNDLE_HEADER,
    BUNDLE_WEIGHTS,
)
from ..peft_format.read import LINEAR, module_scaling

FORMAT = "soppu-bundle"
VERSION = 1


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
