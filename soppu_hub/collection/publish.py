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
from ..hub.collection import commit_titled, holds_nothing, repo_exists
from ..hub.push import push_folder
from ..peft_format.layout import BUNDLE_DIR, BUNDLE_HEADER, COLLECTION_DIR
from .format import COLLECTION_FILE, Member, read_collection, write_members
from .remote import Collection, open_collection, update_members

PUBLISH_MESSAGE = "soppu-hub: publish collection"


def existing_members(repo_id: str, *, token: str | bool | None = None) -> list[Member]:
    """The members list of a collection already on the Hub ([] when the repo does not exist yet, or holds nothing:
    a publish stopped between creating it and its first commit)."""
    if not repo_exists(repo_id, token=token) or holds_nothing(repo_id, token=token):
        return []
    return open_collection(repo_id, token=token).members


def check_collection_target(repo_id: str, targets: list[str], *, refit: bool, token: str | bool | None = None) -> None:
    """Before any work: publishing over a collection that has members this run leaves out (joined since) would drop
    them from its list; only --refit (which includes every member) may replace it."""
    if refit:
        return
    extra = [m for m in existing_members(repo_id, token=token) if (m.repo_id or m.name) not in set(targets)]
    if extra:
        raise CollectionError(
            f"collection {repo_id} already has {len(extra)} member(s) this run leaves out (first: "
            f"{extra[0].repo_id or extra[0].name}); fit them all again with --collection {repo_id} "
            "--refit, or publish to another --collection"
        )


def publish_collection(folder: Path, repo_id: str, *, private: bool = False, token: str | bool | None = None) -> str:
    """The collection folder as one commit (none when the Hub already holds it); returns the head's sha. Members the
    Hub lists with the same cluster and errors keep their recorded revisions, so a rerun changes nothing."""
    if not (folder / COLLECTION_FILE).is_file():
        raise CollectionError(f"{folder} is not a collection folder (no {COLLECTION_FILE}); nothing was published")
    info = read_collection(folder)
    known = {
        (m.repo_id, m.cluster, m.mean_rel_error, m.max_rel_error, m.source): m.revision
        for m in existing_members(repo_id, token=token)
    }
    members = open_collection(folder).members
    for m in members:
        m.revision = known.get((m.repo_id, m.cluster, m.mean_rel_error, m.max_rel_error, m.source), m.revision)
    write_members(folder, info, members)
    pushed = push_folder(
        folder, repo_id, private=private, token=token, commit_message=PUBLISH_MESSAGE, skip_unchanged=True
    )
    return pushed.commit or last_publish(repo_id, token=token)


def last_publish(repo_id: str, *, token: str | bool | None = None) -> str:
    """The commit of the latest publish: the revision the members of an unchanged collection already name (later
    commits only record revisions or add joiners)."""
    return commit_titled(repo_id, PUBLISH_MESSAGE, token=token)


def name_revision(bundle_folder: Path, revision: str) -> None:
    """Write the collection revision a member's bases are in into its bundle header (known only once pushed)."""
    path = bundle_folder / BUNDLE_HEADER
    header = json.loads(path.read_text())
    header["bases"]["revision"] = revision
    path.write_text(json.dumps(header))  # one line, as save_bundle writes it


def record_revisions(repo_id: str, revisions: dict[str, str], *, token: str | bool | None = None) -> str | None:
    """The members files: each pushed member's repo commit (repo id -> sha), in one commit on the head."""
    coll = open_collection(repo_id, token=token)
    if all(revisions.get(m.repo_id, m.revision) == m.revision for m in coll.members):
        return None  # every member already names that revision: no commit

    def change(members):
        for m in members:
            m.revision = revisions.get(m.repo_id, m.revision)
        return members

    return update_members(coll, change, message="soppu-hub: record member revisions")


def listed_cluster(repo_id: str, coll: Collection, *, token: str | bool | None = None) -> int | None:
    """The cluster of `coll` a member repo's bundle on the Hub names now (None: not a member of it, or no such repo)."""
    from ..hub.info import fetch_file

    found = fetch_file(repo_id, f"{BUNDLE_DIR}/{BUNDLE_HEADER}", token=token)
    ref = bases_ref(found.parent) if found is not None else None
    c = ref.get("cluster") if ref and ref.get("collection") == coll.name else None
    return c if isinstance(c, int) and 0 <= c < len(coll.info.clusters) else None


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
        raise CollectionError(
            f"{folder}: collection {coll.name} has no cluster {c} with the bases this member was made "
            f"with (basis id {want}); fetch the member's matching revision or join again"
        )
    return coll.bases(c)
