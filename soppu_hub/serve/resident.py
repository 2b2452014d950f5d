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
class ModuleStack:
    """One module position, every cluster and member: U (C, m, R), V^T (C, R, d), each member's cluster, and the
    members' cores in slot order (r x r, or P (N, R, k) and Q (N, k, R) when all were stored factored).

    A batch folds each row's core into its basis (S_i V^T, U) and runs them as gathered plain LoRA factors: two
    batched matmuls for all resident rows whatever their clusters, instead of a group of small matmuls per cluster."""

    U: torch.Tensor
    Vt: torch.Tensor
    cluster: torch.Tensor  # (N,) long
    cores: torch.Tensor | None = None
    P: torch.Tensor | None = None
    Q: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.U, self.Vt, self.cores, self.P, self.Q) if t is not None]

    def applier(self, slots: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """x (b, s, d) -> delta (b, s, m) for rows using members `slots`, built once per batch composition (which
        changes at nearly every step under a stream). Rows outnumbering clusters: x goes through every cluster's
        V^T at once (one matmul), each row keeps its own cluster's block, then its core and its U; so a new
        composition gathers only cores and U. Fewer rows than clusters: each row's core folded into its basis."""
        if len(slots) < self.U.shape[0]:
            A, B = self.row_factors(slots)
            return lambda x: torch.bmm(torch.bmm(x.to(A.dtype), A.transpose(1, 2)), B.transpose(1, 2))
        C, R = self.U.shape[0], self.U.shape[2]
        S = self.cores[slots] if self.cores is not None else torch.bmm(self.P[slots], self.Q[slots])
        c = self.cluster[slots]
        V, St, Ut, rows = self.Vt.reshape(C * R, -1), S.transpose(1, 2), self.U[c].transpose(1, 2), torch.arange(len(slots))

        def apply(x: torch.Tensor) -> torch.Tensor:
            h = (x.to(V.dtype) @ V.T).view(x.shape[0], x.shape[1], C, R)[rows, :, c]  # (b, s, R): own cluster's block
            return torch.bmm(torch.bmm(h, St), Ut)
        return apply

    def row_factors(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (b, R, d), B (b, m, R)) for rows using members `slots`: delta y = B A x = U S_i V^T x."""
        S = self.cores[slots] if self.cores is not None else torch.bmm(self.P[slots], self.Q[slots])
        c = self.cluster[slots]
        return torch.bmm(S, self.Vt[c]), self.U[c]


@dataclass
class ResidentCollection:
    name: str
    revision: str | None
    slots: dict[str, int] = field(default_factory=dict)  # engine name -> the member's slot in every ModuleStack
    ids: dict[str, str] = field(default_factory=dict)  # what a request may send (repo id, name) -> engine name
    modules: dict[str, ModuleStack] = field(default_factory=dict)  # module key -> every cluster's bases and cores
    clusters: int = 0
    first: str = ""  # the first member's folder (local) or repo id: loaded through PEFT for its LoRA layers
    local: bool = True

    @property
    def members(self) -> int:
        return len(self.slots)

    def params(self) -> int:
        return sum(t.numel() for st in self.modules.values() for t in st.tensors())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.modules.values() for t in st.tensors())

    def summary(self) -> dict:
        return {"collection": self.name, "revision": self.revision, "members": self.members,
                "clusters": self.clusters, "params": self.params(), "bytes": self.nbytes()}


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
    bundles = []
    for m, folder in zip(coll.members, folders):
        bundles.append(load_bundle(folder / BUNDLE_DIR, bases=bases[m.cluster]))
        engine_name = f"{PREFIX}{coll.name}:{m.name}"
        res.slots[engine_name] = len(bundles) - 1
        for alias in filter(None, (m.name, m.repo_id)):
            res.ids[alias] = engine_name
    res.clusters = len(bases)
    cluster = torch.tensor([m.cluster for m in coll.members])
    for key in bundles[0].modules:
        res.modules[key] = _stack(key, bases, bundles, cluster, dtype)
    log(f"{res.members} members of {coll.name} resident: {res.nbytes() / 1e6:.1f} MB")
    return res


def _stack(key: str, bases: dict[int, dict[str, torch.Tensor]], bundles: list, cluster: torch.Tensor,
           dtype: torch.dtype) -> ModuleStack:
    """One module's ModuleStack; clusters of different ranks are zero-padded to the largest (zero directions add
    nothing)."""
    pad = torch.nn.functional.pad
    Us = [bases[c][f"{key}.U"] for c in sorted(bases)]
    Vs = [bases[c][f"{key}.V"] for c in sorted(bases)]
    R = max(u.shape[1] for u in Us)
    st = ModuleStack(U=torch.stack([pad(u, (0, R - u.shape[1])) for u in Us]).to(dtype),
                     Vt=torch.stack([pad(v, (0, R - v.shape[1])).T for v in Vs]).to(dtype).contiguous(), cluster=cluster)
    cores = [b.modules[key].cores[0] for b in bundles]
    if all(isinstance(core, FactoredCore) for core in cores):
        k = max(core.P.shape[1] for core in cores)
        st.P = torch.stack([pad(core.P, (0, k - core.P.shape[1], 0, R - core.P.shape[0])) for core in cores]).to(dtype)
        st.Q = torch.stack([pad(core.Q, (0, R - core.Q.shape[1], 0, k - core.Q.shape[0])) for core in cores]).to(dtype)
    else:
        mats = [b.modules[key].core_matrix(0) for b in bundles]
        st.cores = torch.stack([pad(m, (0, R - m.shape[1], 0, R - m.shape[0])) for m in mats]).to(dtype)
    return st


def attach(peft_model, resident: ResidentCollection) -> int:
    """Give every PEFT LoRA Linear at one of the collection's module positions its stacks; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module_name, module in peft_model.named_modules():
        if not isinstance(module, LoraLinear):
            continue
        stack = resident.modules.get(module_name.removeprefix(KEY_PREFIX))
        if stack is not None:
            module._soppu_resident = (resident.slots, stack)
            module._soppu_plan = None  # a plan made before may name these rows as base rows
            n += 1
    return n
