"""A whole collection resident at once: each cluster's bases once, every member's core stacked, no PEFT per member.

Loading a thousand members one by one through PEFT builds a thousand sets of modules. Here a collection (the
folder `compress --collection` writes, or its Hub repo) becomes, per module position and cluster, U, V and one
stack of cores (r x r, or the two thin factors when every core of the cluster was stored factored); a request
names a member by its repo id or its name, and the gathered forward (peft_patch) applies that member's rows as
U S_i V^T x with its slot of the stack. Memory: the bases once plus one core per member and module.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..compression.bundle import FactoredCore, load_bundle
from ..peft_format.layout import BUNDLE_DIR, BUNDLE_HEADER, BUNDLE_WEIGHTS, KEY_PREFIX

PREFIX = "resident:"  # the adapter name a resident member's rows carry through the engine


@dataclass
class ClusterStack:
    """One module position of one cluster: U (m, R), V (d, R), and the members' cores in slot order."""

    U: torch.Tensor
    V: torch.Tensor
    cores: torch.Tensor | None = None  # (N, R, R)
    P: torch.Tensor | None = None  # factored: S_i = P_i Q_i, P (N, R, k), Q (N, k, R), zero-padded to the largest k
    Q: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.U, self.V, self.cores, self.P, self.Q) if t is not None]


@dataclass
class ResidentCollection:
    name: str
    revision: str | None
    slots: dict[str, tuple[int, int]] = field(default_factory=dict)  # engine name -> (cluster, slot)
    ids: dict[str, str] = field(default_factory=dict)  # what a request may send (repo id, name) -> engine name
    modules: dict[str, dict[int, ClusterStack]] = field(default_factory=dict)  # module key -> cluster -> stack
    first: str = ""  # the first member's folder (local) or repo id: loaded through PEFT for its LoRA layers
    local: bool = True

    @property
    def members(self) -> int:
        return len(self.slots)

    def params(self) -> int:
        return sum(t.numel() for stacks in self.modules.values() for s in stacks.values() for t in s.tensors())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for stacks in self.modules.values() for s in stacks.values()
                   for t in s.tensors())

    def summary(self) -> dict:
        return {"collection": self.name, "revision": self.revision, "members": self.members,
                "clusters": len({c for c, _ in self.slots.values()}), "params": self.params(), "bytes": self.nbytes()}


def _member_folders(coll, token, log: Callable[[str], None]) -> list[Path]:
    """Each member's folder holding soppu/bundle.*: beside a local collection, else downloaded (cores only)."""
    if coll.folder is not None:
        return [coll.folder.parent / m.name for m in coll.members]
    from ..hub.collection import download_file

    def fetch(m) -> Path:
        if not m.repo_id:
            raise ValueError(f"member {m.name} of {coll.name} was never pushed (no repo id)")
        download_file(m.repo_id, f"{BUNDLE_DIR}/{BUNDLE_HEADER}", revision=m.revision, token=token)
        weights = download_file(m.repo_id, f"{BUNDLE_DIR}/{BUNDLE_WEIGHTS}", revision=m.revision, token=token)
        return weights.parent.parent
    log(f"fetching the cores of {len(coll.members)} members")
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(fetch, coll.members))


def load_resident(source: str | Path, *, revision: str | None = None, token: str | bool | None = None,
                  dtype: torch.dtype = torch.float32, log: Callable[[str], None] = lambda m: None) -> ResidentCollection:
    """Read every member's cores of a collection (a folder or a Hub repo) onto its clusters' bases."""
    from ..collection.remote import open_collection

    coll = open_collection(source, revision=revision, token=token)
    bases = {c: coll.bases(c) for c in range(len(coll.info.clusters))}
    folders = _member_folders(coll, token, log)
    if not coll.members:
        raise ValueError(f"collection {coll.name} has no members")
    res = ResidentCollection(coll.name, coll.revision, local=coll.folder is not None)
    res.first = str(folders[0]) if res.local else coll.members[0].repo_id
    per: dict[int, list] = {}
    for m, folder in zip(coll.members, folders):
        bundle = load_bundle(folder / BUNDLE_DIR, bases=bases[m.cluster])
        slot = len(per.setdefault(m.cluster, []))
        per[m.cluster].append(bundle)
        engine_name = f"{PREFIX}{coll.name}:{m.name}"
        res.slots[engine_name] = (m.cluster, slot)
        for alias in filter(None, (m.name, m.repo_id)):
            res.ids[alias] = engine_name
    for c, bundles in per.items():
        for key, mb in bundles[0].modules.items():
            cores = [b.modules[key].cores[0] for b in bundles]
            stack = ClusterStack(U=mb.U.to(dtype).contiguous(), V=mb.V.to(dtype).contiguous())
            if all(isinstance(core, FactoredCore) for core in cores):
                k = max(core.P.shape[1] for core in cores)
                stack.P = torch.stack([torch.nn.functional.pad(core.P, (0, k - core.P.shape[1])) for core in cores]).to(dtype)
                stack.Q = torch.stack([torch.nn.functional.pad(core.Q, (0, 0, 0, k - core.Q.shape[0])) for core in cores]).to(dtype)
            else:
                stack.cores = torch.stack([b.modules[key].core_matrix(0) for b in bundles]).to(dtype)
            res.modules.setdefault(key, {})[c] = stack
    log(f"{res.members} members of {coll.name} resident: {res.nbytes() / 1e6:.1f} MB")
    return res


def attach(peft_model, resident: ResidentCollection) -> int:
    """Give every PEFT LoRA Linear at one of the collection's module positions its stacks; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module_name, module in peft_model.named_modules():
        if not isinstance(module, LoraLinear):
            continue
        stacks = resident.modules.get(module_name.removeprefix(KEY_PREFIX))
        if stacks is not None:
            module._soppu_resident = (resident.slots, stacks)
            module._soppu_plan = None  # a plan made before may name these rows as base rows
            n += 1
    return n
