"""Load a soppu-compressed adapter through its bundle so adapters compressed together share one basis.

An adapter from a bundle is delta = U S_i V^T. As a rank-r LoRA either A = V^T (shared) and B = U S_i,
or B = U (shared) and A = S_i V^T; we share the larger side per module. After PEFT loads the adapter, its
shared-side weight is replaced by the one Parameter already resident for that basis, so N adapters of one
bundle hold that side once instead of N times.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..bundle import load_bundle
from ..lora import KEY_PREFIX

BUNDLE_SUBDIR = "soppu"


@dataclass
class _Basis:
    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # module -> shared weight
    users: set[str] = field(default_factory=set)  # PEFT adapter names using it


def has_bundle(folder: Path) -> bool:
    return (folder / BUNDLE_SUBDIR / "bundle.json").is_file()


class SharedBases:
    """basis_id -> shared Parameters, reference-counted by adapter name."""

    def __init__(self) -> None:
        self.bases: dict[str, _Basis] = {}
        self.of_adapter: dict[str, str] = {}

    def write_peft(self, folder: Path, out: Path) -> tuple[str, dict[str, str]]:
        """A PEFT folder of rank r built from the bundle slice; returns (basis_id, module -> shared side)."""
        bundle = load_bundle(folder / BUNDLE_SUBDIR)
        rank = max(mb.rank for mb in bundle.modules.values())
        tensors, sides = {}, {}
        for name, mb in bundle.modules.items():
            U, V, S = mb.U.float(), mb.V.float(), mb.core_matrix(0).float()
            pad = rank - mb.rank
            if V.shape[0] >= U.shape[0]:
                A, B, sides[name] = V.T, U @ S, "A"
            else:
                A, B, sides[name] = S @ V.T, U, "B"
            if pad:
                A = torch.cat([A, A.new_zeros(pad, A.shape[1])])
                B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
            tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = A.contiguous()
            tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = B.contiguous()
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps(config))
        return bundle.basis_id(), sides

    def load(self, load_peft, folder: Path, name: str):
        """Load adapter `name` from a repo folder with a bundle, sharing its basis; returns the PeftModel.

        `load_peft(path, name)` loads a plain PEFT folder (creating the PeftModel on first use).
        """
        from peft.tuners.lora import LoraLayer

        with tempfile.TemporaryDirectory() as tmp:
            basis_id, sides = self.write_peft(folder, Path(tmp))
            peft_model = load_peft(tmp, name)
        basis = self.bases.setdefault(basis_id, _Basis())
        prefix = "base_model.model."
        for module_name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer) or name not in module.lora_A:
                continue
            key = module_name.removeprefix(prefix)
            side = sides.get(key)
            if side is None:
                continue
            holder = module.lora_A[name] if side == "A" else module.lora_B[name]
            shared = basis.params.get(key)
            if shared is None:
                basis.params[key] = holder.weight
            elif shared.shape == holder.weight.shape:
                holder.weight = shared
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
    """LoRA parameters actually held in memory: shared tensors counted once."""
    if peft_model is None:
        return 0
    from peft.tuners.lora import LoraLayer

    seen: dict[int, int] = {}
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for holder in (*module.lora_A.values(), *module.lora_B.values()):
                seen[holder.weight.data_ptr()] = holder.weight.numel()
    return sum(seen.values())
