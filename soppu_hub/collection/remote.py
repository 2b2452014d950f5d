"""A collection as read from a folder or from a Hub repo at one commit, and the changes made to it.

A joiner reads collection.json, members.json, the centroids and one cluster's bases, nothing else; changes
to the members list go through hub.collection.commit_on_head, so concurrent joins never lose an entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..hub.collection import commit_on_head, download_file, head_revision
from ..hub.common import HubError, is_repo_id
from .format import (
    CENTROIDS_FILE,
    COLLECTION_FILE,
    MEMBERS_FILE,
    CollectionInfo,
    Member,
    load_bases,
    members_text,
    parse_collection,
    parse_members,
    read_collection,
    read_members,
)


@dataclass
class Collection:
    """Read from a local folder (`folder`) or a Hub repo at one commit (`repo_id`, `revision`)."""

    info: CollectionInfo
    members: list[Member]
    name: str  # the repo id, or the folder as given
    folder: Path | None = None
    repo_id: str | None = None
    revision: str | None = None  # the commit sha the files were read at
    token: str | bool | None = None

    def file(self, path: str) -> Path:
        """One file at the revision read (downloaded on first use; never a member's adapter)."""
        if self.folder is not None:
            return self.folder / path
        return download_file(self.repo_id, path, revision=self.revision, token=self.token)

    def centroids(self) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.file(CENTROIDS_FILE)))["centroids"]

    def bases(self, cluster: int) -> dict[str, torch.Tensor]:
        """ "<module>.U" / ".V" of one cluster."""
        return load_bases(self.file(self.info.clusters[cluster].file), self.info.stored)


def open_collection(source: str | Path, *, revision: str | None = None, token: str | bool | None = None) -> Collection:
    """A local folder, or a Hub repo at `revision` (default: the head of main)."""
    path = Path(source)
    if path.is_dir():
        info = read_collection(path)
        return Collection(info, read_members(path, len(info.clusters)), str(source), folder=path)
    if not is_repo_id(str(source)):
        raise HubError(f"--collection {source}: neither a folder nor a repo id (owner/name)", "not a collection")
    repo_id = str(source)
    sha = head_revision(repo_id, revision, token)
    info = parse_collection(download_file(repo_id, COLLECTION_FILE, revision=sha, token=token).read_text(), repo_id)
    text = download_file(repo_id, MEMBERS_FILE, revision=sha, token=token).read_text()
    return Collection(
        info, parse_members(text, repo_id, len(info.clusters)), repo_id, repo_id=repo_id, revision=sha, token=token
    )


def update_members(coll: Collection, change: Callable[[list[Member]], list[Member]], *, message: str) -> str:
    """Apply `change` to the members list as it is at the head and commit it in one commit; returns the sha."""

    def build(head: str) -> dict[str, bytes]:
        info = (
            coll.info
            if head == coll.revision
            else parse_collection(
                download_file(coll.repo_id, COLLECTION_FILE, revision=head, token=coll.token).read_text(), coll.repo_id
            )
        )
        text = download_file(coll.repo_id, MEMBERS_FILE, revision=head, token=coll.token).read_text()
        return {MEMBERS_FILE: members_text(change(parse_members(text, coll.repo_id, len(info.clusters)))).encode()}

    return commit_on_head(coll.repo_id, build, message=message, token=coll.token)
