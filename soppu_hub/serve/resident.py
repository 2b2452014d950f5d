"""A whole collection resident at once: each cluster's bases once, every member's core stacked, no PEFT per member.

Loading a thousand members one by one through PEFT builds a thousand sets of modules. Here a collection (the
folder `compress --collection` writes, or its Hub repo) becomes, per module position and cluster, U, V and one
stack of cores (r x r, or the two thin factors when every core of the cluster was stored factored); a request
names a member by its repo id or its name, and the gathered forward (peft_patch) applies that member's rows as
U S_i V^T x with its slot of the stack, plus X_i Y_i x where the member keeps private directions (gathered per row
like a plain adapter's factors). Memory: the bases once plus one core (and its private factors) per member and module.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..compression.bundle import FactoredCore, load_bundle
from ..compression.quantize import Store
from ..peft_format.layout import BUNDLE_DIR, BUNDLE_HEADER, BUNDLE_WEIGHTS, KEY_PREFIX
from .quantized import QuantizedItems

Held = torch.Tensor | QuantizedItems  # a stack of members' parts: values, or a quantized store's codes
PREFIX = "resident:"  # the adapter name a resident member's rows carry through the engine


@dataclass
class ModuleStack:
    """One module position, every cluster and member: U (C, m, R), V^T (C, R, d), and the members' cores in slot
    order (r x r, or P (N, R, k) and Q (N, k, R) when all were stored factored).

    A batch's resident rows run in a few batched matmuls whatever their clusters (`applier`), instead of a group of
    small matmuls per cluster."""

    U: torch.Tensor
    Vt: torch.Tensor
    cores: Held | None = None
    P: Held | None = None
    Q: Held | None = None
    Xt: Held | None = None  # (N, p, m): members' private directions X_i^T, zero-padded to the most any has
    Yt: Held | None = None  # (N, d, p): Y_i^T

    def parts(self) -> list[Held]:
        return [t for t in (self.U, self.Vt, self.cores, self.P, self.Q, self.Xt, self.Yt) if t is not None]

    def params(self) -> int:
        return sum(t.numbers if isinstance(t, QuantizedItems) else t.numel() for t in self.parts())

    def nbytes(self) -> int:
        return sum(t.nbytes() if isinstance(t, QuantizedItems) else t.numel() * t.element_size() for t in self.parts())

    def _rows(self, held: Held, slots: torch.Tensor) -> torch.Tensor:
        """Each slot's item: gathered, or de-quantized from the store's codes (a quantized collection)."""
        return held.gather(slots, self.U.dtype) if isinstance(held, QuantizedItems) else held.index_select(0, slots)

    def applier(self, rows: ResidentRows) -> Callable[[torch.Tensor], torch.Tensor]:
        """x (b, s, d) -> delta (b, s, m) = U_c S_i V_c^T x per row, built once per batch composition (which changes
        at nearly every step under a stream): three gathers (each row's core, V^T and U), then three batched
        matmuls per step. Measured per layer on 2 cores, 16 rows, a new composition each step: 120 us, against 250
        for x through every cluster's V^T and a gather of each row's block, and 160 for folding S_i into V^T."""
        S = self.row_cores(rows.slots).transpose(1, 2)
        V, Ut = (
            self.Vt.index_select(0, rows.cluster).transpose(1, 2),
            self.U.index_select(0, rows.cluster).transpose(1, 2),
        )
        if self.Xt is None:
            return lambda x: torch.bmm(torch.bmm(torch.bmm(x.to(V.dtype), V), S), Ut)
        Y, Xt = self._rows(self.Yt, rows.slots), self._rows(self.Xt, rows.slots)  # private: gathered like
        return lambda x: (
            torch.bmm(torch.bmm(torch.bmm(x.to(V.dtype), V), S), Ut)  # a plain adapter's factors
            + torch.bmm(torch.bmm(x.to(V.dtype), Y), Xt)
        )

    def row_cores(self, slots: torch.Tensor) -> torch.Tensor:
        """(b, R, R): each row's member's core."""
        return (
            self._rows(self.cores, slots)
            if self.cores is not None
            else torch.bmm(self._rows(self.P, slots), self._rows(self.Q, slots))
        )


@dataclass
class ResidentRows:
    """The resident rows of one batch composition, worked out once per step for every module position: where they
    sit in the batch (None: every row), each one's member slot and its cluster."""

    rows: torch.Tensor | None
    slots: torch.Tensor
    cluster: torch.Tensor


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
    cluster: torch.Tensor | None = None  # (N,) each member's cluster, by slot
    _last: tuple | None = field(default=None, repr=False)  # (key, ResidentRows | None) of the last composition

    def rows_for(self, key: tuple, names: tuple[str, ...], device) -> ResidentRows | None:
        """The resident rows of batch `names` (None: none), once per composition `key` for all module positions."""
        if self._last is None or self._last[0] != key:
            pairs = [(i, self.slots[n]) for i, n in enumerate(names) if n in self.slots]
            rr = None
            if pairs:
                slots = torch.tensor([k for _, k in pairs], device=device)
                rows = None if len(pairs) == len(names) else torch.tensor([i for i, _ in pairs], device=device)
                rr = ResidentRows(rows, slots, self.cluster.to(device).index_select(0, slots))
            self._last = (key, rr)
        return self._last[1]

    @property
    def members(self) -> int:
        return len(self.slots)

    def params(self) -> int:
        return sum(st.params() for st in self.modules.values())

    def nbytes(self) -> int:
        """Resident bytes: the bases once, every member's part as held (a quantized store: its codes)."""
        return sum(st.nbytes() for st in self.modules.values())

    def summary(self) -> dict:
        return {
            "collection": self.name,
            "revision": self.revision,
            "members": self.members,
            "clusters": self.clusters,
            "params": self.params(),
            "bytes": self.nbytes(),
        }


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


def load_resident(
    source: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    dtype: torch.dtype = torch.float32,
    log: Callable[[str], None] = lambda m: None,
) -> ResidentCollection:
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
    res.cluster = torch.tensor([m.cluster for m in coll.members])
    store = coll.info.stored
    for key in bundles[0].modules:
        res.modules[key] = _stack(key, bases, bundles, dtype, store if store.quantized else None)
    log(f"{res.members} members of {coll.name} resident: {res.nbytes() / 1e6:.1f} MB")
    return res


def _stack(
    key: str, bases: dict[int, dict[str, torch.Tensor]], bundles: list, dtype: torch.dtype, store: Store | None = None
) -> ModuleStack:
    """One module's ModuleStack; clusters of different ranks are zero-padded to the largest (zero directions add
    nothing). With a quantized `store` the members' parts stay its codes (QuantizedItems); the bases are values."""
    pad = torch.nn.functional.pad
    Us = [bases[c][f"{key}.U"] for c in sorted(bases)]
    Vs = [bases[c][f"{key}.V"] for c in sorted(bases)]
    R = max(u.shape[1] for u in Us)
    st = ModuleStack(
        U=torch.stack([pad(u, (0, R - u.shape[1])) for u in Us]).to(dtype),
        Vt=torch.stack([pad(v, (0, R - v.shape[1])).T for v in Vs]).to(dtype).contiguous(),
    )

    def held(
        items: list[torch.Tensor | None], shape: tuple[int, int], transpose: bool = False, codes: bool = True
    ) -> Held:
        if store is not None and codes:
            return QuantizedItems.build(items, shape, store, transpose=transpose)
        out = torch.zeros(len(items), *shape, dtype=dtype)
        for i, t in enumerate(items):
            if t is not None:
                t = t.T if transpose else t
                out[i, : t.shape[0], : t.shape[1]] = t.to(dtype)
        return out

    cores = [b.modules[key].cores[0] for b in bundles]
    if all(isinstance(core, FactoredCore) for core in cores):
        k = max(core.P.shape[1] for core in cores)
        st.P, st.Q = held([c.P for c in cores], (R, k)), held([c.Q for c in cores], (k, R))
    else:  # codes only where every core is held as its file holds it (dense); a mix, or diagonal cores: values
        dense = all(isinstance(c, torch.Tensor) and c.dim() == 2 for c in cores)
        st.cores = held([b.modules[key].core_matrix(0) for b in bundles], (R, R), codes=dense)
    private = [b.modules[key].private.get(0) for b in bundles]
    p = max((X.shape[1] for X, _ in filter(None, private)), default=0)
    if p:
        m, d = st.U.shape[1], st.Vt.shape[2]
        st.Xt = held([xy[0] if xy else None for xy in private], (p, m), transpose=True)
        st.Yt = held([xy[1] if xy else None for xy in private], (d, p), transpose=True)
    return st


def attach(peft_model, resident: ResidentCollection) -> int:
    """Give every PEFT LoRA Linear at one of the collection's module positions its stacks; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from .peft_patch import adapters_changed

    adapters_changed()  # a plan made before may name these rows as base rows
    n = 0
    for module_name, module in peft_model.named_modules():
        if not isinstance(module, LoraLinear):
            continue
        stack = resident.modules.get(module_name.removeprefix(KEY_PREFIX))
        if stack is not None:
            module._soppu_resident = (resident, stack)
            n += 1
    return n
