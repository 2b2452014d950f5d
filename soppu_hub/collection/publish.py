"""Publishing a collection with its members, and finding a member's bases again (for loading and serving).

Order of a push: the collection first (its commit is the revision members name), then the members, then
one commit recording each member's revision in the members list.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..compression.bundle import bases_ref
from ..errors import CollectionError
from ..hub.collection import head_revision
from ..hub.push import push_folder
from ..peft_format.layout import BUNDLE_DIR, BUNDLE_HEADER, COLLECTION_DIR
from .format import COLLECTION_FILE
from .remote import open_collection, update_members


def publish_collection(folder: Path, repo_id: str, *, private: bool = False, token: str | bool | None = None) -> str:
    """The collection folder as one commit (none when the Hub already holds it); returns the head's sha."""
    if not (folder / COLLECTION_FILE).is_file():
        raise CollectionError(f"{folder} is not a collection folder (no {COLLECTION_FILE}); nothing was published")
    push_folder(folder, repo_id, private=private, token=token, commit_message="soppu-hub: publish collection",
                skip_unchanged=True)
    return head_revision(repo_id, None, token)


def name_revision(bundle_folder: Path, revision: str) -> None:
    """Write the collection revision a member's bases are in into its bundle header (known only once pushed)."""
    path = bundle_folder / BUNDLE_HEADER
    header = json.loads(path.read_text())
    header["bases"]["revision"] = revision
    path.write_text(json.dumps(header, indent=2))


def record_revisions(repo_id: str, revisions: dict[str, str], *, token: str | bool | None = None) -> str | None:
    """members.json: each pushed member's repo commit (repo id -> sha), in one commit on the head."""
    if not revisions:
        return None
    coll = open_collection(repo_id, token=token)

    def change(members):
        for m in members:
            m.revision = revisions.get(m.repo_id, m.revision)
        return members

    return update_members(coll, change, message="soppu-hub: record member revisions")


def member_bases(folder: Path, *, token: str | bool | None = None) -> dict[str, torch.Tensor] | None:
    """The bases a member repo folder's bundle names (None when it holds its own): from the collection folder next
    to it when that is the one (an --out folder), else from the Hub at the named revision. The content id is
    checked, so a member never runs with bases it was not made with."""
    ref = bases_ref(folder / BUNDLE_DIR)
    if ref is None:
        return None
    want = json.loads((folder / BUNDLE_DIR / BUNDLE_HEADER).read_text()).get("basis_id")
    local = folder.parent / COLLECTION_DIR
    source = local if (local / COLLECTION_FILE).is_file() else ref.get("collection")
    if not source:
        raise CollectionError(f"{folder}: its bundle names no collection for its bases; compress it again")
    coll = open_collection(source, revision=None if source == local else ref.get("revision"), token=token)
    c = ref.get("cluster")
    if not isinstance(c, int) or not 0 <= c < len(coll.info.clusters) or coll.info.clusters[c].basis_id != want:
        raise CollectionError(f"{folder}: collection {coll.name} has no cluster {c} with the bases this member was made "
                              f"with (basis id {want}); fetch the member's matching revision or join again")
    return coll.bases(c)
