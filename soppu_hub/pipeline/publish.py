"""Push a run's outputs: one commit per adapter repo, a few at a time, and with a collection its repo first and the
members' revisions last; a rerun pushes only what changed (pipeline/unchanged.py says what float noise is)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..compression.plan import Progress
from ..hub.common import PushError
from ..hub.push import PushResult, failure_reason, push_folder
from ..peft_format.layout import BUNDLE_DIR, COLLECTION_DIR
from .spec import JobSpec
from .unchanged import collection_unchanged, same_adapter


def default_collection(targets: list[str]) -> str:
    """Where several pushed adapters keep their bases once: in the first target's namespace, named by the set of
    target repos, so the same command finds its own collection again and another set never overwrites it."""
    import hashlib

    digest = hashlib.sha256("\n".join(sorted(targets)).encode()).hexdigest()[:10]
    return f"{targets[0].split('/')[0]}/soppu-bases-{digest}"


def push_outputs(
    folder: Path,
    names: list[str],
    targets: list[str],
    spec: JobSpec,
    log: Callable[[str], None],
    progress: Progress | None,
) -> dict[str, PushResult]:
    """push_all, with --collection: the collection first (members name its commit), the members' revisions last."""
    if not spec.collection:
        return push_all(folder, names, targets, spec, log, progress)
    from ..collection.publish import name_revision, publish_collection, record_revisions

    if not spec.refit and collection_unchanged(folder, names, targets, spec.collection, token=spec.token):
        log(f"unchanged {spec.collection} and its {len(names)} members (already on the Hub up to float noise, skipped)")
        return {t: PushResult(t) for t in targets}
    sha = publish_collection(folder / COLLECTION_DIR, spec.collection, private=spec.private, token=spec.token)
    log(f"published collection {spec.collection} at {sha[:12]}")
    for name in names:
        name_revision(folder / name / BUNDLE_DIR, sha)
    pushed = push_all(folder, names, targets, spec, log, progress)
    # skipped members too: a run stopped after pushing some of them left their revisions unrecorded
    record_revisions(spec.collection, {r: p.revision for r, p in pushed.items() if p.revision}, token=spec.token)
    return pushed


def push_all(
    folder: Path,
    names: list[str],
    targets: list[str],
    spec: JobSpec,
    log: Callable[[str], None],
    progress: Progress | None = None,
) -> dict[str, PushResult]:
    """One commit per repo, `spec.workers` repos at a time; a repo whose adapter is already on the Hub unchanged
    is skipped (so a rerun after a failure pushes only what is missing or changed; without --collection,
    "unchanged" includes the float noise of another machine's thread count: pipeline/unchanged.py; with it, push_outputs
    checks the whole collection that way first). On a failure the message
    says exactly which repos got their commit and which did not."""
    from concurrent.futures import ThreadPoolExecutor

    message = f"soppu-hub: JD-{spec.config.method} rank {spec.config.rank}"
    pushed: dict[str, PushResult] = {}
    failed: dict[str, str] = {}

    def one(name: str, repo_id: str) -> None:
        if failed:
            return  # after a failure, start nothing new
        try:
            result = push_folder(
                folder / name,
                repo_id,
                private=spec.private,
                token=spec.token,
                commit_message=message,
                skip_unchanged=True,
                same=None
                if spec.collection
                else lambda changed: same_adapter(folder / name, repo_id, changed, token=spec.token),
            )
        except Exception as e:  # noqa: BLE001 - any failure of one push is reported with all the others
            failed[repo_id] = failure_reason(e)
            return
        pushed[repo_id] = result
        if progress:  # the bar says how far; the run's summary lists every repo with its commit
            progress(len(pushed), len(targets))
        else:
            log(f"unchanged {repo_id} (already on the Hub, skipped)" if result.skipped else f"pushed {repo_id}")

    with ThreadPoolExecutor(max_workers=max(1, spec.workers)) as pool:
        list(pool.map(one, names, targets))
    if failed:
        first, detail = next(iter(failed.items()))
        done = ", ".join(t for t in targets if t in pushed) or "none"
        todo = ", ".join(t for t in targets if t not in pushed)
        raise PushError(
            f"push to {first} failed ({detail}); pushed: {done}; not pushed: {todo} "
            "(their previous revisions are unchanged): run the same command again"
        ) from None
    return pushed
