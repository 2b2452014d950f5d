"""The join job as one library call: read the collection, place and project the adapter, write, push, list.

Everything that can be refused is refused before anything is written: the source, the collection and its
members list, write access to both repos, the base model and shapes, and the error bar. The member repo is
staged and pushed in one commit; the members list changes in one commit on the collection's head.
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..collection.format import (
    CENTROIDS_FILE,
    COLLECTION_FILE,
    ClusterInfo,
    CollectionInfo,
    Member,
    cluster_file,
    members_file,
    members_text,
    members_texts,
    parse_collection,
    save_bases,
    write_collection,
)
from ..collection.join import (
    JoinResult,
    JoinSpec,
    check_fits,
    check_spec,
    fetch_adapter,
    member_store,
    new_member,
    open_for_join,
    own_cluster,
    place,
    signature,
    write_member,
)
from ..collection.remote import Collection, update_members
from ..compression.bundle import Bundle
from ..compression.store import stored_bundle
from ..errors import CollectionError, SoppuError
from ..hub.collection import commit_on_head, download_file
from ..hub.push import check_write_access, push_folder, target_repo_ids, whoami
from ..peft_format.layout import CARD_NAME
from .outputs import lorax_sizes, staged_output


@dataclass
class _NewCluster:
    """What --new-cluster adds to the collection: the adapter's own bases and its signature as the centroid."""

    bundle: Bundle
    centroid: object
    mean_error: float


def run_join(spec: JoinSpec, *, log: Callable[[str], None] | None = None) -> JoinResult:
    log = log or (lambda _: None)
    check_spec(spec)
    coll = open_for_join(spec)
    target = None
    if spec.push:
        if coll.repo_id is None:
            raise SoppuError(
                f"--collection {coll.name} is a folder: join it with --no-push --out DIR (pushing needs "
                "the collection's Hub repo)"
            )
        from ..hub.pull import parse_source

        user, writable = whoami(spec.token)
        target = target_repo_ids(
            [parse_source(spec.source, spec.revision).name], user=user, push_to=spec.push_to, namespace=spec.namespace
        )[0]
        check_write_access([target, coll.repo_id], writable, user)
    adapter, source_folder = fetch_adapter(spec)
    check_fits(adapter, coll)
    base = adapter.base_model or coll.info.base_model
    spec.export = spec.export.for_base(lorax_sizes(base, spec.token), base)
    dtype = spec.export.torch_dtype(adapter.dtype)
    try:
        c, bundle, errors, bar = place(adapter, coll, spec.max_error, log, spec.private_error)
        how, basis_id, new = "join", coll.info.clusters[c].basis_id, None
    except CollectionError:
        if not spec.new_cluster:
            raise
        bundle, errors = own_cluster(adapter, coll.info.rank)
        bundle = stored_bundle(bundle, member_store(coll.info, dtype))  # its bases kept as the collection keeps bases
        how, basis_id, bar = "new-cluster", bundle.basis_id(), float("nan")
        new = _NewCluster(bundle, signature(adapter, coll.info.probes), statistics.fmean(errors.values()))
    result = JoinResult(adapter.name, -1, how, 0.0, 0.0, bar, repo_id=target, out=spec.out)
    with staged_output(spec.out, overwrite=spec.overwrite) as tmp:
        revision = coll.revision
        if new is not None:
            c, revision = _add_cluster(coll, new, basis_id)
            log(f"added cluster {c} to {coll.name}")
        ref = {"collection": coll.name, "revision": revision, "cluster": c}
        entry = {
            "name": adapter.name,
            "source": adapter.source,
            "collection": coll.name,
            "collection_revision": revision,
            "cluster": c,
            "how": how,
            "bar": bar,
            "shared_bases": True,
        }
        errors = write_member(tmp, adapter, bundle, ref, basis_id, spec.export, entry, coll.info)
        _write_card(tmp, entry, adapter, bundle, source_folder, spec, target)
        member = new_member(adapter, c, how, errors, target)
        if target is not None:
            before = _listed_in(
                coll, target
            )  # read before the push replaces it: a member that moves leaves its old cluster
            member.revision = push_folder(
                tmp,
                target,
                private=spec.private,
                token=spec.token,
                commit_message=f"soppu-hub: join {coll.name} (cluster {c})",
            ).commit
            log(f"pushed {target}")
            result.collection_revision = update_members(
                coll,
                lambda ms: _with(ms, member),
                message=f"soppu-hub: {target} joins cluster {c}",
                clusters=sorted({c, *before}),
            )
        elif coll.folder is not None:
            for path, text in members_texts(coll.info, _with(coll.members, member)).items():
                _write_local(coll.folder / path, text)
    result.cluster, result.mean_rel_error, result.max_rel_error = c, member.mean_rel_error, member.max_rel_error
    return result


def _write_card(
    folder: Path, entry: dict, adapter, bundle: Bundle, source_folder: Path, spec: JoinSpec, target: str | None
) -> None:
    from ..cards.render import CardSpec, render_join_card
    from ..cards.write import source_license

    job = CardSpec(
        folder,
        0,
        target,
        adapter.base_model,
        [adapter.source],
        spec.command,
        "",
        None if target else str(Path(spec.out).resolve()),
        source_license(source_folder),
    )
    own = sum(
        mb.cores[0].numel() + sum(x.numel() + y.numel() for x, y in mb.private.values())
        for mb in bundle.modules.values()
    )
    (folder / CARD_NAME).write_text(render_join_card(entry, job, params_before=adapter.num_params, core_params=own))


def _listed_in(coll: Collection, repo_id: str) -> list[int]:
    """The cluster a member repo's current bundle says it is in (it joined this collection before), else []."""
    from ..collection.publish import listed_cluster

    c = listed_cluster(repo_id, coll, token=coll.token)
    return [] if c is None else [c]


def _with(members: list[Member], member: Member) -> list[Member]:
    """The list with `member` in place of an earlier entry of the same repo (or name, for local members)."""
    key = member.repo_id or member.name
    return [m for m in members if (m.repo_id or m.name) != key] + [member]


def _write_local(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    tmp.replace(path)


def _add_cluster(coll: Collection, new: _NewCluster, basis_id: str) -> tuple[int, str | None]:
    """Commit the new cluster's bases, centroid and entry (on the head, concurrent-safe); (index, revision)."""
    import tempfile

    import torch

    from ..collection.build import save_centroids

    scratch = Path(tempfile.mkdtemp(prefix="soppu-new-cluster-"))
    bases = {n: (mb.U, mb.V) for n, mb in new.bundle.modules.items()}

    def files(info: CollectionInfo, centroids: torch.Tensor) -> tuple[int, dict[str, Path]]:
        k = len(info.clusters)
        info.clusters.append(ClusterInfo(k, basis_id, new.mean_error))
        save_bases(scratch / cluster_file(k), bases, basis_id, info.stored)
        save_centroids(
            scratch / CENTROIDS_FILE, torch.cat([centroids.double(), (new.centroid / new.centroid.norm())[None]])
        )
        write_collection(scratch, info)
        paths = [cluster_file(k), CENTROIDS_FILE, COLLECTION_FILE]  # collection.json last: it names the others
        if info.version >= 3:
            (scratch / members_file(k)).write_text(members_text([]))  # the member is listed in it next
            paths.insert(0, members_file(k))
        return k, {p: scratch / p for p in paths}

    try:
        if coll.folder is not None:
            k, made = files(coll.info, coll.centroids())
            for p in made:
                (coll.folder / p).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(made[p], coll.folder / p)
            return k, None
        from safetensors.torch import load_file

        chosen: list[int] = []

        def build(head: str) -> dict[str, Path]:
            text = download_file(coll.repo_id, COLLECTION_FILE, revision=head, token=coll.token).read_text()
            cen = load_file(str(download_file(coll.repo_id, CENTROIDS_FILE, revision=head, token=coll.token)))
            k, made = files(parse_collection(text, coll.repo_id), cen["centroids"])
            chosen[:] = [k]
            return made

        sha = commit_on_head(coll.repo_id, build, message="soppu-hub: new cluster", token=coll.token)
        return chosen[0], sha
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
