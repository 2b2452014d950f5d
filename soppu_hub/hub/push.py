"""Push to the Hub: who the token is, where it may write, and one commit per repo (none when nothing changed)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import SoppuError
from ..progress import hold_tqdm_lock
from .common import HubError, is_repo_id, retry


@dataclass(frozen=True)
class PushResult:
    """What one push did: the commit it made (`skipped`: none, the Hub already held this adapter)."""

    repo_id: str
    commit: str | None = None  # the new commit's sha
    url: str | None = None  # its page on the Hub
    head: str | None = None  # skipped: the commit the repo already holds this adapter at

    @property
    def revision(self) -> str | None:
        """The commit that holds the adapter now, pushed or not."""
        return self.commit or self.head

    @property
    def skipped(self) -> bool:
        return self.commit is None


def whoami(token: str | bool | None) -> tuple[str, set[str]]:
    """(user name, namespaces the token may write to). Fails clearly without a valid token."""
    import requests
    from huggingface_hub import HfApi
    from huggingface_hub.errors import LocalTokenNotFoundError

    try:
        info = retry(lambda: HfApi(token=token).whoami(), "whoami")
    except LocalTokenNotFoundError:
        raise HubError("pushing needs a Hub token: run `hf auth login` or set HF_TOKEN (or pass --no-push)") from None
    except requests.HTTPError:  # HfHubHTTPError subclasses it; whoami raises the plain one on 401
        raise HubError("the Hub token was refused: log in again (hf auth login) or fix HF_TOKEN") from None
    writable = {info["name"]}
    for org in info.get("orgs") or []:
        if org.get("roleInOrg", "write") in ("admin", "write", "contributor"):
            writable.add(org["name"])
    return info["name"], writable


def target_repo_ids(
    names: list[str], *, user: str, push_to: str | None = None, namespace: str | None = None
) -> list[str]:
    """`<user>/<name>-soppu` by default; --push-to names the one repo; --namespace picks an org."""
    if push_to:
        if len(names) != 1:
            raise SoppuError(f"--push-to names one repo but {len(names)} adapters were given; use --namespace for many")
        if not is_repo_id(push_to):
            raise SoppuError(f"--push-to {push_to!r} is not a repo id; use owner/name")
        return [push_to]
    ns = namespace or user
    return [f"{ns}/{n}-soppu" for n in names]


def check_write_access(repo_ids: list[str], writable: set[str], user: str) -> None:
    for repo_id in repo_ids:
        ns = repo_id.split("/")[0]
        if ns not in writable:
            raise HubError(
                f"your token (user {user}) cannot write to the namespace {ns!r} for {repo_id}; "
                f"push to one of {', '.join(sorted(writable))} with --namespace or --push-to"
            )


def _local_ids(path: Path) -> tuple[str, str]:
    """(git blob sha1, sha256) of a file, as the Hub names regular and LFS files."""
    import hashlib

    from huggingface_hub.utils.sha import git_hash

    data = path.read_bytes()
    return git_hash(data), hashlib.sha256(data).hexdigest()


def changed_files(folder: Path, repo_id: str, *, token: str | bool | None = None) -> list[str] | None:
    """The files of `folder` whose bytes the repo does not hold ([]: a rerun has nothing to push; card, report and
    plots keep run timings out); None when the repo does not exist or holds another set of file names."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        tree = retry(lambda: list(HfApi(token=token).list_repo_tree(repo_id, recursive=True)), f"list {repo_id}")
    except RepositoryNotFoundError:
        return None
    remote = {
        f.path: (f.lfs.sha256 if getattr(f, "lfs", None) else f.blob_id)
        for f in tree
        if hasattr(f, "blob_id") and f.path != ".gitattributes"
    }
    local = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    if set(remote) != set(local):
        return None
    return sorted(k for k, path in local.items() if remote[k] not in _local_ids(path))


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | bool | None = None,
    commit_message: str = "Upload soppu-compressed adapter",
    skip_unchanged: bool = False,
    same: Callable[[list[str]], bool] | None = None,
) -> PushResult:
    """Create the repo if needed and put the whole folder in ONE commit (stale files deleted in it too).
    With `skip_unchanged`, a repo that already holds this adapter is left alone (a skipped result): byte for byte,
    or where `same(changed files)` says the differing files hold the same content (the caller's notion of noise)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    hold_tqdm_lock()  # pushes run from several threads: huggingface_hub's upload thread_map races without it
    if skip_unchanged:
        changed = changed_files(folder, repo_id, token=token)
        if changed == [] or (changed and same is not None and same(changed)):
            head = retry(lambda: HfApi(token=token).repo_info(repo_id).sha, f"look up {repo_id}")
            return PushResult(repo_id, head=head)
    api = HfApi(token=token)
    retry(lambda: api.create_repo(repo_id, private=private, exist_ok=True), f"create {repo_id}")
    local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    remote = retry(lambda: api.list_repo_files(repo_id), f"list {repo_id}")
    ops: list = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in local]
    ops += [CommitOperationDelete(path_in_repo=p) for p in remote if p not in local and p != ".gitattributes"]
    info = api.create_commit(repo_id, ops, commit_message=commit_message)
    return PushResult(repo_id, info.oid, info.commit_url)


def failure_reason(e: BaseException) -> str:
    """A failed push's first line and, when it wraps another ("Error while uploading ..."), the root cause's, with
    query strings cut (presigned upload URLs carry credentials)."""
    import re

    def line(x: BaseException) -> str:
        return re.sub(r"\?\S*", "?...", str(x).splitlines()[0]) if str(x) else type(x).__name__

    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    return line(e) if root is e else f"{line(e)}: {type(root).__name__}: {line(root)[:300]}"
