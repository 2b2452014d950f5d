"""The collection repo on disk: collection.json, the centroids, and per cluster a bases file and a members file.

collection.json says what every member shares (base model, module shapes, method, shared rank, target error, the
settings that made it) and, per cluster, its bases file and content id; each cluster's members file lists who is in
it (repo, revision, errors, source). A joiner reads collection.json, the centroids and ONE cluster's bases and
members, never another member's adapter, so what a join downloads does not grow with the collection (version 3;
versions 1 and 2 kept every member in one members.json, and are still read and joined).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..compression.quantize import Store
from ..compression.tensorfile import load_tensors, save_tensors
from ..errors import CollectionError

FORMAT = "soppu-collection"
# 1: float bases, one members.json; 2: the bases files may hold group-wise codes (collection.json "store");
# 3: one members file per cluster (what a join reads and rewrites stays one cluster's worth)
VERSION = 3
READS = (1, 2, 3)
COLLECTION_FILE = "collection.json"
MEMBERS_FILE = "members.json"  # versions 1 and 2: every member in one file
CLUSTERS_DIR = "clusters"
CENTROIDS_FILE = f"{CLUSTERS_DIR}/centroids.safetensors"
HOW = ("compress", "join", "new-cluster")
MAX_MEMBERS_FILE = 64 * 2**20  # bytes: about 250,000 members in one cluster; a larger file is refused unread


def cluster_file(c: int) -> str:
    return f"{CLUSTERS_DIR}/cluster-{c}.safetensors"


def members_file(c: int) -> str:
    return f"{CLUSTERS_DIR}/members-{c}.json"


@dataclass
class ClusterInfo:
    index: int
    basis_id: str  # content hash of the bases (Bundle.basis_id): the backend holds one copy per id
    max_error: float  # worst mean relative error of a member compressed with these bases: a joiner's default bar
    file: str = ""

    def __post_init__(self) -> None:
        self.file = self.file or cluster_file(self.index)


@dataclass
class Member:
    name: str
    cluster: int
    mean_rel_error: float
    max_rel_error: float
    source: str  # what was compressed: a Hub id (with @revision) or a folder
    how: str = "compress"  # compress (fitted with the bases), join (projected onto them), new-cluster
    repo_id: str | None = None  # None while only written locally
    revision: str | None = None  # the member repo's commit


@dataclass
class CollectionInfo:
    base_model: str | None
    method: str
    rank: int
    target_error: float | None
    modules: dict[str, list[int]]  # module -> [out, in]: a joiner must match these shapes
    probes: list[str]  # the modules whose signatures place an adapter (cluster.module_signature)
    clusters: list[ClusterInfo]
    settings: dict = field(default_factory=dict)  # the CompressConfig fields the fit ran with
    command: str = "soppu-hub compress"
    store: dict | None = None  # Store.header() of a quantized store: how the bases files and members' cores are kept
    version: int = VERSION  # as read; a collection is written at the version it was read at (old ones stay readable)

    @property
    def stored(self) -> Store:
        """The store of the bases files and of members' cores (a float store: as the files' dtype says)."""
        return Store.from_header(self.store) or Store("float32")

    def members_files(self, clusters: list[int] | None = None) -> list[str]:
        """The files listing the members of `clusters` (default: all): one per cluster from version 3 on."""
        if self.version < 3:
            return [MEMBERS_FILE]
        return [members_file(c) for c in (range(len(self.clusters)) if clusters is None else clusters)]


def write_collection(folder: Path, info: CollectionInfo) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    body = {"format": FORMAT, **asdict(info)}
    if info.store is None:
        del body["store"]  # a float store: the bases files say their dtype
    (folder / COLLECTION_FILE).write_text(json.dumps(body, separators=(",", ":")))  # every joiner downloads it


def parse_collection(text: str, where: str) -> CollectionInfo:
    """collection.json's text -> CollectionInfo; anything damaged is one CollectionError naming `where`."""
    try:
        body = json.loads(text)
    except ValueError:
        raise CollectionError(
            f"{where}: {COLLECTION_FILE} is not JSON; the collection is damaged, publish it again"
        ) from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CollectionError(
            f"{where} is not a soppu collection ({COLLECTION_FILE} lacks format {FORMAT!r}); "
            "name a repo written by soppu-hub compress --collection"
        )
    if body.get("version") not in READS:
        raise CollectionError(
            f"{where}: collection format version {body.get('version')!r} is not one this soppu-hub "
            f"reads ({', '.join(map(str, READS))}); upgrade soppu-hub (pip install -U soppu-hub)"
        )
    try:
        info = CollectionInfo(**{f.name: body[f.name] for f in fields(CollectionInfo) if f.name in body})
        if info.store is not None and info.version < 2:
            raise ValueError("a quantized store needs version 2 or later")
        info.clusters = [ClusterInfo(**c) for c in info.clusters]
        ok = (
            [c.index for c in info.clusters] == list(range(len(info.clusters)))
            and len(info.clusters) > 0
            and all(
                isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) for x in s)
                for s in info.modules.values()
            )
        )
        Store.from_header(info.store)  # a store record this version cannot read raises ValueError
    except (TypeError, AttributeError, ValueError):
        ok = False
    if not ok:
        raise CollectionError(
            f"{where}: {COLLECTION_FILE} is incomplete or edited by hand; publish the collection "
            "again (soppu-hub compress --collection ... --refit)"
        )
    return info


def read_collection(folder: Path) -> CollectionInfo:
    path = folder / COLLECTION_FILE
    if not path.is_file():
        raise CollectionError(
            f"{folder} is not a soppu collection (no {COLLECTION_FILE}); name a folder or repo "
            "written by soppu-hub compress --collection"
        )
    return parse_collection(path.read_text(), str(folder))


def members_texts(info: CollectionInfo, members: list[Member], clusters: list[int] | None = None) -> dict[str, str]:
    """Members files (path -> text) of `clusters` (default: all) holding `members`: each in its cluster's file."""
    files = info.members_files(clusters)
    if info.version < 3:
        return {MEMBERS_FILE: members_text(members)}
    chosen = range(len(info.clusters)) if clusters is None else clusters
    if any(m.cluster not in chosen for m in members):
        raise ValueError("a member of a cluster whose members file is not being written")
    return {f: members_text([m for m in members if m.cluster == c]) for f, c in zip(files, chosen)}


def write_members(folder: Path, info: CollectionInfo, members: list[Member]) -> None:
    for path, text in members_texts(info, members).items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text)


def members_text(members: list[Member]) -> str:
    return json.dumps(
        {"members": [asdict(m) for m in members]}, separators=(",", ":")
    )  # a joiner downloads it: compact


def parse_members(text: str, where: str, clusters: int, cluster: int | None = None) -> list[Member]:
    """A members file's text -> members (`cluster`: the one cluster a version-3 file lists); damaged, duplicated or
    pointing at a missing cluster: one CollectionError."""
    try:
        members = [Member(**m) for m in json.loads(text)["members"]]
        ok = unique(members) and all(
            isinstance(m.name, str)
            and isinstance(m.cluster, int)
            and 0 <= m.cluster < clusters
            and m.cluster == (m.cluster if cluster is None else cluster)
            and m.how in HOW
            for m in members
        )
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise CollectionError(
            f"{where}: its members list is damaged or edited by hand (it must list each member once, in the file "
            "of a cluster the collection has); restore it from an earlier revision or --refit"
        )
    return members


def unique(members: list[Member]) -> bool:
    """Each member listed once: by repo id, or by name for a local member (alice/x and bob/x are two members)."""
    keys = [m.repo_id or m.name for m in members]
    return len(set(keys)) == len(keys)


def save_bases(
    path: Path, bases: dict[str, tuple[torch.Tensor, torch.Tensor]], basis_id: str, store: Store | None = None
) -> None:
    """One cluster's bases: "<module>.U" (out x r) and "<module>.V" (in x r); a quantized `store` writes their codes
    (the bases hold what store.stored_bases returned, so the codes come back as written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{n}.{side}": t.contiguous() for n, (U, V) in bases.items() for side, t in (("U", U), ("V", V))}
    save_tensors(path, tensors, f"{FORMAT} bases {basis_id}", store)


def load_bases(path: Path, store: Store | None = None) -> dict[str, torch.Tensor]:
    """One cluster's bases (de-quantized for a quantized `store`: float32); damage is one CollectionError naming the
    file and, for a bad scale or code, the tensor."""
    try:
        return load_tensors(path, store)
    except ValueError as e:
        raise CollectionError(f"{path.name}: {e}; nothing is served from it, download the collection again") from None
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CollectionError(
            f"{path.name}: the cluster's bases cannot be read ({type(e).__name__}); download the collection again"
        ) from None
