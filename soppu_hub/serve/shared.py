"""Load a soppu-compressed adapter through its bundle: the basis resides once, each adapter keeps its core.

An adapter from a bundle is delta = U S_i V^T. PEFT computes lora_B(lora_A(x)); we make lora_A a
`CoreLinear` (x -> S_i (V^T x), with V^T the one Parameter shared by every adapter of the bundle and S_i
the adapter's own r x r core) and give lora_B the shared U. N adapters of one bundle then hold U and V
once plus N small cores, instead of N full LoRA factor pairs.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..bundle import load_bundle
from ..lora import KEY_PREFIX

BUNDLE_SUBDIR = "soppu"


class CoreLinear(torch.nn.Module):
    """lora_A replacement: x -> S (V^T x). `weight` is the shared V^T (PEFT reads its dtype and device)."""

    def __init__(self, shared_vt: torch.nn.Parameter, core: torch.Tensor) -> None:
        super().__init__()
        self.weight = shared_vt
        self.core = torch.nn.Parameter(core.to(shared_vt.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight), self.core)


@dataclass
class _Basis:
    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # "<module>.A" (V^T) / ".B" (U)
    users: set[str] = field(default_factory=set)  # PEFT adapter names using it


def has_bundle(folder: Path) -> bool:
    return (folder / BUNDLE_SUBDIR / "bundle.json").is_file()


class SharedBases:
    """basis_id -> shared Parameters, reference-counted by adapter name."""

    def __init__(self) -> None:
        self.bases: dict[str, _Basis] = {}
        self.of_adapter: dict[str, str] = {}

    def write_peft(self, folder: Path, out: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """A rank-r PEFT folder (A = V^T, B = U S) from the bundle slice.

        Returns (basis_id, module -> core S, module -> U), all zero-padded to the bundle's largest rank.
        """
        bundle = load_bundle(folder / BUNDLE_SUBDIR)
        rank = max(mb.rank for mb in bundle.modules.values())
        tensors, cores, bases_u = {}, {}, {}
        for name, mb in bundle.modules.items():
            pad = rank - mb.rank
            U, VT = F.pad(mb.U.float(), (0, pad)), F.pad(mb.V.float().T, (0, 0, 0, pad))
            S = F.pad(mb.core_matrix(0).float(), (0, pad, 0, pad))
            tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = VT.contiguous()
            tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = (U @ S).contiguous()
            cores[name], bases_u[name] = S, U
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps(config))
        return bundle.basis_id(), cores, bases_u

    def load(self, load_peft, folder: Path, name: str):
        """Load adapter `name` from a repo folder with a bundle, sharing its basis; returns the PeftModel.

        `load_peft(path, name)` loads a plain PEFT folder (creating the PeftModel on first use).
        """
        from peft.tuners.lora import LoraLayer

        with tempfile.TemporaryDirectory() as tmp:
            basis_id, cores, bases_u = self.write_peft(folder, Path(tmp))
            peft_model = load_peft(tmp, name)
        basis = self.bases.setdefault(basis_id, _Basis())
        for module_name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer) or name not in module.lora_A:
                continue
            key = module_name.removeprefix("base_model.model.")
            if key not in cores:
                continue
            a, b = module.lora_A[name], module.lora_B[name]
            vt = basis.params.setdefault(key + ".A", a.weight)
            u = basis.params.setdefault(key + ".B", torch.nn.Parameter(bases_u[key].to(b.weight), requires_grad=False))
            module.lora_A[name] = CoreLinear(vt, cores[key].to(a.weight))
            b.weight = u
        basis.users.add(name)
        self.of_adapter[name] = basis_id
        return peft_model

    def release(self, name: str) -> None:
        basis_id = self.of_adapter.pop(name, None)
        if basis_id is None:
            return
        basis = self.bases[basis_id]
        basis.users.discard(name)
        if not basis.users:
            del self.bases[basis_id]

    def summary(self) -> dict:
        return {bid: {"adapters": len(b.users), "shared_params": sum(p.numel() for p in b.params.values())}
                for bid, b in self.bases.items()}


def resident_lora_params(peft_model) -> int:
    """LoRA parameters actually held in memory: shared tensors counted once, cores included."""
    if peft_model is None:
        return 0
    from peft.tuners.lora import LoraLayer

    seen: dict[int, int] = {}
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for holder in (*module.lora_A.values(), *module.lora_B.values()):
                for p in holder.parameters():
                    seen[p.data_ptr()] = p.numel()
    return sum(seen.values())
