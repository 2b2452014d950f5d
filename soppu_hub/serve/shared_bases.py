"""Load a soppu-compressed adapter through its bundle: the basis resides once, each adapter keeps its core.

An adapter from a bundle is delta = U S_i V^T. PEFT computes lora_B(lora_A(x)); we make lora_A a
`CoreLinear` (x -> S_i (V^T x), with V^T the one Parameter shared by every adapter of the bundle and S_i
the adapter's own core: r x r, or its two thin factors when the bundle stored it factored) and give lora_B the shared
U. N adapters of one bundle then hold U and V
once plus N small cores, instead of N full LoRA factor pairs. A module where the adapter keeps private directions
stays as its PEFT export loaded it (exact: the export holds the shared part and the private one together).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..compression.bundle import Core, FactoredCore, load_bundle
from ..peft_format.layout import BUNDLE_DIR, BUNDLE_HEADER, KEY_PREFIX


class CoreLinear(torch.nn.Module):
    """lora_A replacement: x -> S (V^T x). `weight` is the shared V^T (PEFT reads its dtype and device).

    A core stored factored (S = P Q, rank k < R / 2) stays factored: x -> P (Q (V^T x)), 2 R k instead of R^2."""

    def __init__(self, shared_vt: torch.nn.Parameter, core: Core) -> None:
        super().__init__()
        self.weight = shared_vt
        if isinstance(core, FactoredCore):
            self.core, self.core_p, self.core_q = None, _frozen(core.P, shared_vt), _frozen(core.Q, shared_vt)
        else:
            self.core, self.core_p, self.core_q = _frozen(core, shared_vt), None, None

    @property
    def factored(self) -> bool:
        return self.core is None

    def dense_core(self) -> torch.Tensor:
        return self.core_p @ self.core_q if self.factored else self.core

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.weight)
        if self.factored:
            return F.linear(F.linear(h, self.core_q), self.core_p)
        return F.linear(h, self.core)


def _frozen(t: torch.Tensor, like: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t.to(like.dtype).contiguous(), requires_grad=False)


@dataclass
class _Basis:
    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # "<module>.A" (V^T) / ".B" (U)
    users: set[str] = field(default_factory=set)  # PEFT adapter names using it


def has_bundle(folder: Path) -> bool:
    return (folder / BUNDLE_DIR / BUNDLE_HEADER).is_file()


class SharedBases:
    """basis_id -> shared Parameters, reference-counted by adapter name."""

    def __init__(self) -> None:
        self.bases: dict[str, _Basis] = {}
        self.of_adapter: dict[str, str] = {}
        self.fetched: dict[str, dict[str, torch.Tensor]] = {}  # a collection cluster's bases, by its basis id

    def _collection_bases(self, folder: Path, token: str | None) -> dict[str, torch.Tensor] | None:
        """A collection member's bases (bundle version 3), fetched once per cluster while any member is loaded."""
        import json

        from ..collection.publish import member_bases
        from ..compression.bundle import bases_ref

        if bases_ref(folder / BUNDLE_DIR) is None:
            return None
        key = json.loads((folder / BUNDLE_DIR / BUNDLE_HEADER).read_text()).get("basis_id", "")
        if key not in self.fetched:
            self.fetched[key] = member_bases(folder, token=token)
        return self.fetched[key]

    def load(self, load_peft, folder: Path, name: str, token: str | None = None):
        """Load adapter `name` from a repo folder with a bundle, sharing its basis; returns the PeftModel.

        `load_peft(path, name)` loads the repo's plain PEFT export (creating the PeftModel on first use), so
        carried tensors, lora_B biases and embedding LoRA load exactly as PEFT loads them; then every linear
        module of the bundle swaps its factors for the shared U, V^T and the adapter's own core. A collection
        member's bases come from its collection (one cluster's file, fetched once): members joined one by one and
        members compressed together then hold the same single copy.
        """
        from peft.tuners.lora import LoraLayer

        bundle = load_bundle(folder / BUNDLE_DIR, bases=self._collection_bases(folder, token))
        peft_model = load_peft(str(folder), name)
        basis_id = bundle.basis_id()
        basis = self.bases.setdefault(basis_id, _Basis())
        for module_name, module in peft_model.named_modules():
            if not isinstance(module, LoraLayer) or name not in module.lora_A:
                continue
            key = module_name.removeprefix(KEY_PREFIX)
            mb = bundle.modules.get(key)
            if mb is None or 0 in mb.private:  # private directions: the export's own factors hold U S V^T + X Y
                continue
            b = module.lora_B[name]
            like = b.weight
            vt = basis.params.setdefault(
                key + ".A", torch.nn.Parameter(mb.V.T.contiguous().to(like), requires_grad=False)
            )
            u = basis.params.setdefault(key + ".B", torch.nn.Parameter(mb.U.contiguous().to(like), requires_grad=False))
            core = mb.cores[0]
            module.lora_A[name] = CoreLinear(vt, core if isinstance(core, FactoredCore) else mb.core_matrix(0))
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
            if not self.bases:
                self.fetched.clear()  # nothing resident: no collection bases are worth keeping either

    def summary(self) -> dict:
        return {
            bid: {"adapters": len(b.users), "shared_params": sum(p.numel() for p in b.params.values())}
            for bid, b in self.bases.items()
        }


def resident_lora_params(peft_model) -> int:
    """LoRA parameters actually held in memory: shared tensors counted once, cores included."""
    return resident_lora(peft_model)[0]


def resident_lora(peft_model, adapter: str | None = None) -> tuple[int, int]:
    """(parameters, bytes) of the LoRA weights held in memory, shared tensors counted once; of one adapter's
    layers only when `adapter` is given (its shared bases included)."""
    if peft_model is None:
        return 0, 0
    from peft.tuners.lora import LoraLayer

    seen: dict[int, tuple[int, int]] = {}
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            holders = (
                [d[adapter] for d in (module.lora_A, module.lora_B) if adapter in d]
                if adapter is not None
                else [*module.lora_A.values(), *module.lora_B.values()]
            )
            for holder in holders:
                for p in holder.parameters():
                    seen[p.data_ptr()] = (p.numel(), p.numel() * p.element_size())
    return sum(n for n, _ in seen.values()), sum(b for _, b in seen.values())
