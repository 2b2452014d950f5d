"""A collection as read from a folder or from a Hub repo at one commit, and the changes made to its members lists.

A joiner reads collection.json, the centroids and one cluster's bases and members file, nothing else (the members
of every cluster are read only when asked for: serving, refitting, listing); changes to members files go through
hub.collection.commit_on_head, so concurrent joins never lose an entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CollectionError
from ..hub.collection import commit_on_head, download_file, head_revision
from ..hub.common import HubError, is_repo_id
from .format import (
    CENTROIDS_FILE,
    COLLECTION_FILE,
    MAX_MEMBERS_FILE,
    CollectionInfo,
    Member,
    load_bases,
    members_texts,
    parse_collection,
    parse_members,
    read_collection,
    unique,
)


@dataclass
class Collection:
    """Read from a local folder (`folder`) or a Hub repo at one commit (`repo_id`, `revision`)."""

    info: CollectionInfo
    name: str  # the repo id, or the folder as given
    folder: Path | None = None
    repo_id: str | None = None
    revision: str | None = None  # the commit sha the files were read at
    token: str | bool | None = None
    _members: list[Member] | None = field(default=None, repr=False)

    def file(self, path: str) -> Path:
        """One file at the revision read (downloaded on first use; never a member's adapter)."""
        if self.folder is not None:
            return self.folder / path
        return download_file(self.repo_id, path, revision=self.revision, token=self.token)

    def centroids(self) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.file(CENTROIDS_FILE)))["centroids"]

    def bases(self, cluster: int) -> dict[str, torch.Tensor]:
        """ "<module>.U" / ".V" of one cluster, checked against the shapes collection.json declares."""
        path = self.info.clusters[cluster].file
        bases = load_bases(self.file(path), self.info.stored)
        for name, (out, inp) in self.info.modules.items():
            U, V = bases.get(f"{name}.U"), bases.get(f"{name}.V")
            if U is None or V is None:
                continue  # a cluster need not adapt every module the collection has
            if U.dim() != 2 or V.dim() != 2 or U.shape[0] != out or V.shape[0] != inp or U.shape[1] != V.shape[1]:
                raise CollectionError(
                    f"{self.name}: {path}: {name}.U / .V are {tuple(U.shape)} / {tuple(V.shape)}, but collection.json "
                    f"declares {name} as {out} x {inp}; the collection is damaged, publish it again"
                )
        return bases

    def cluster_members(self, clusters: list[int] | None = None) -> list[Member]:
        """The members of `clusters` (default: all) at the revision read; only their members files are read."""
        return read_members_at(self.info, self.file, self.name, clusters)

    @property
    def members(self) -> list[Member]:
        """Every member (every cluster's members file, read once)."""
        if self._members is None:
            self._members = self.cluster_members()
        return self._members


def read_members_at(
    info: CollectionInfo, file: Callable[[str], Path], where: str, clusters: list[int] | None = None
) -> list[Member]:
    """The members of `clusters` (default: all) from the members files `file` finds; damage is one CollectionError."""
    out = []
    chosen = range(len(info.clusters)) if clusters is None else clusters
    for path, c in zip(info.members_files(clusters), chosen):
        found = file(path)
        if not found.is_file():
            raise CollectionError(f"{where}: no {path}; the collection is incomplete, publish it again")
        if found.stat().st_size > MAX_MEMBERS_FILE:  # refused before it is read: memory stays bounded
            raise CollectionError(
                f"{where}: {path} is {found.stat().st_size / 2**20:.0f} MiB, more than a members file can be "
                f"({MAX_MEMBERS_FILE // 2**20} MiB); the collection is damaged or hostile, restore an earlier revision"
            )
        one = None if info.version < 3 else c
        out += parse_members(found.read_text(), f"{where}: {path}", len(info.clusters), one)
    if not unique(out):
        raise CollectionError(f"{where}: a member is listed twice; restore an earlier revision or --refit")
    return out


def open_collection(source: str | Path, *, revision: str | None = None, token: str | bool | None = None) -> Collection:
    """A local folder, or a Hub repo at `revision` (default: the head of main)."""
    path = Path(source)
    if path.is_dir():
        return Collection(read_collection(path), str(source), folder=path)
    if not is_repo_id(str(source)):
        raise HubError(f"--collection {source}: neither a folder nor a repo id (owner/name)", "not a collection")
    repo_id = str(source)
    sha = head_revision(repo_id, revision, token)
    info = parse_collection(download_file(repo_id, COLLECTION_FILE, revision=sha, token=token).read_text(), repo_id)
    return Collection(info, repo_id, repo_id=repo_id, revision=sha, token=token)


def update_members(
    coll: Collection,
    change: Callable[[list[Member]], list[Member]],
    *,
    message: str,
    clusters: list[int] | None = None,
) -> str:
    """Apply `change` to the members of `clusters` (default: all) as they are at the head and commit their members
    files in one commit; returns the sha. `change` must keep each member in one of those clusters."""

    def build(head: str) -> dict[str, bytes]:
        def at_head(path: str) -> Path:
            return download_file(coll.repo_id, path, revision=head, token=coll.token)

        info = coll.info if head == coll.revision else parse_collection(at_head(COLLECTION_FILE).read_text(), coll.name)
        members = change(read_members_at(info, at_head, coll.name, clusters))
        return {path: text.encode() for path, text in members_texts(info, members, clusters).items()}

    return commit_on_head(coll.repo_id, build, message=message, token=coll.token)
