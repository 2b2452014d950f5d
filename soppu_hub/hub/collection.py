"""Hub traffic for a collection repo: one file at one commit, the head's sha, whether it exists, the last publish,
and commits that must not race.

A members list is changed only by a commit whose parent is the head it was read at (the Hub refuses it with
412 when someone else committed in between); `commit_on_head` then reads the head again and rebuilds the
change, so two users joining at once both land and nobody's entry is lost.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

from .common import HubError, retry

COMMIT_ATTEMPTS = 8


def download_file(repo_id: str, path: str, *, revision: str | None, token: str | bool | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    what = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        return Path(retry(lambda: hf_hub_download(repo_id, path, revision=revision, token=token), f"download {what}"))
    except RevisionNotFoundError:
        raise HubError(
            f"{what}: revision {revision!r} does not exist in the collection; check the branch, tag or commit",
            f"revision {revision!r} does not exist",
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{what}: collection repo not found, or private and your token cannot see it; check the id or "
            "log in (hf auth login or HF_TOKEN)",
            "not found on the Hub, or private",
        ) from None
    except EntryNotFoundError:
        raise HubError(
            f"{what}: has no {path}; it is not a soppu collection (or it is incomplete): name a repo written "
            "by soppu-hub compress --collection",
            f"it has no {path}",
        ) from None


def head_revision(repo_id: str, revision: str | None, token: str | bool | None) -> str:
    """The commit sha `revision` (default: main) points at now."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return retry(lambda: HfApi(token=token).model_info(repo_id, revision=revision).sha, f"look up {repo_id}")
    except RevisionNotFoundError:
        raise HubError(
            f"{repo_id}@{revision}: revision {revision!r} does not exist in the collection; check the branch, "
            "tag or commit",
            f"revision {revision!r} does not exist",
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{repo_id}: collection repo not found, or private and your token cannot see it; check the id or "
            "log in (hf auth login or HF_TOKEN)",
            "not found on the Hub, or private",
        ) from None


def repo_exists(repo_id: str, *, token: str | bool | None = None) -> bool:
    from huggingface_hub import HfApi

    return retry(lambda: HfApi(token=token).repo_exists(repo_id), f"look up {repo_id}")


def holds_nothing(repo_id: str, *, token: str | bool | None = None) -> bool:
    """Whether a repo holds no file of its own (at most the .gitattributes a new repo starts with): what a publish
    killed between creating the repo and its first commit leaves."""
    from huggingface_hub import HfApi

    files = retry(lambda: HfApi(token=token).list_repo_files(repo_id), f"list the files of {repo_id}")
    return set(files) <= {".gitattributes"}


def commit_titled(repo_id: str, title: str, *, token: str | bool | None = None) -> str:
    """The sha of the latest commit with this title (the head's when none has it)."""
    from huggingface_hub import HfApi

    commits = retry(lambda: HfApi(token=token).list_repo_commits(repo_id), f"list the commits of {repo_id}")
    return next((c.commit_id for c in commits if c.title == title), commits[0].commit_id)


Files = dict[str, "bytes | Path"]  # path in the repo -> its new content, or a local file holding it


def commit_on_head(
    repo_id: str,
    build: Callable[[str], Files],
    *,
    message: str,
    token: str | bool | None = None,
    attempts: int = COMMIT_ATTEMPTS,
) -> str:
    """`build(head)` -> the files to write, made from the repo as it is at `head`, committed with that head as
    parent; on a concurrent commit (409 / 412) read the new head and build again. Returns the commit sha."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    for attempt in range(attempts):
        head = head_revision(repo_id, None, token)
        ops = [
            CommitOperationAdd(path, data if isinstance(data, bytes) else str(data))
            for path, data in build(head).items()
        ]
        try:
            return retry(
                lambda ops=ops, head=head: api.create_commit(repo_id, ops, commit_message=message, parent_commit=head),
                f"commit to {repo_id}",
            ).oid
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in (401, 403):
                raise HubError(
                    f"{repo_id}: your token cannot write to this collection; ask its owner for write access, "
                    "or run without pushing (--no-push --out DIR)",
                    "no write access",
                ) from None
            if status not in (409, 412):
                raise
        time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))  # someone else committed in between: again
    raise HubError(
        f"{repo_id}: the repo kept changing under {attempts} tries; run the same command again",
        "too many concurrent commits",
    )
