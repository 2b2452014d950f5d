"""On-disk state of the offline Hub: content-addressed blobs, repos, immutable commits, branch refs.

Layout under root:
  objects/<sha256[:2]>/<sha256>            file contents, stored once whatever repo or commit uses them
  repos/<type>/<ns>/<name>/repo.json       {"private": bool, "created": iso}
  repos/<type>/<ns>/<name>/commits/<oid>.json   {"parent", "message", "files": {path: entry}, "date"}
  repos/<type>/<ns>/<name>/refs.json       {"main": oid}
A commit becomes visible only when refs.json is replaced (os.replace), so a failed commit leaves the
previous revision intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from huggingface_hub.utils.sha import git_hash

REPO_TYPES = ("model", "dataset", "space")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
MAX_PATH = 1000
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


class StoreError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class FileEntry:
    sha256: str
    size: int
    git_sha1: str
    lfs: bool

    def as_json(self) -> dict:
        return {"sha256": self.sha256, "size": self.size, "git_sha1": self.git_sha1, "lfs": self.lfs}


def check_path(path: object, what: str = "file path") -> str:
    """A path inside a repo: relative, '/'-separated, no empty, '.' or '..' parts, also once URL-decoded."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH:
        raise StoreError(400, "BadRequest", f"invalid {what}: a non-empty string of at most {MAX_PATH} characters")
    for form in {path, unquote(path)}:
        if (
            form.startswith("/")
            or _BAD_CHARS.search(form)
            or any(p in ("", ".", "..", ".git") for p in form.split("/"))
        ):
            raise StoreError(
                400,
                "BadRequest",
                f"invalid {what} {path[:200]!r}: use a relative path without '.', '..', '.git', '//' or backslashes",
            )
    return path


def check_revision(revision: object) -> str:
    """A branch, tag or commit id: the same rules as a path (so 'refs/pr/1' passes, '../x' does not)."""
    return check_path(revision, "revision")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    # --- blobs -------------------------------------------------------------------------------
    def _object_path(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise StoreError(400, "BadRequest", "oid must be a sha256 hex digest")
        return self.root / "objects" / sha256[:2] / sha256

    def has_object(self, sha256: str) -> bool:
        return self._object_path(sha256).is_file()

    def put_object(self, data: bytes, expected_sha256: str | None = None) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and sha != expected_sha256:
            raise StoreError(400, "BadRequest", "uploaded content does not match its oid")
        path = self._object_path(sha)
        if not path.is_file():
            _atomic_write(path, data)
        return sha

    def read_object(self, sha256: str) -> bytes:
        return self._object_path(sha256).read_bytes()

    # --- repos -------------------------------------------------------------------------------
    def check_repo_id(self, repo_type: str, repo_id: str) -> None:
        self._repo_dir(repo_type, repo_id)

    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        if repo_type not in REPO_TYPES:
            raise StoreError(400, "BadRequest", f"unknown repo type {repo_type}")
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(_NAME.match(p) for p in parts) or ".." in repo_id:
            raise StoreError(400, "BadRequest", f"invalid repo id {repo_id!r}")
        return self.root / "repos" / repo_type / parts[0] / parts[1]

    def repo_meta(self, repo_type: str, repo_id: str) -> dict | None:
        path = self._repo_dir(repo_type, repo_id) / "repo.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> bool:
        """Create an empty repo with an initial commit; False if it already exists."""
        with self.lock:
            d = self._repo_dir(repo_type, repo_id)
            if (d / "repo.json").is_file():
                return False
            gitattributes = (
                b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
            )
            sha = self.put_object(gitattributes)
            files = {".gitattributes": FileEntry(sha, len(gitattributes), git_hash(gitattributes), False)}
            _atomic_write(d / "repo.json", json.dumps({"private": private, "created": _now()}).encode())
            self._write_commit(repo_type, repo_id, None, "initial commit", files)
            return True

    def update_meta(self, repo_type: str, repo_id: str, **changes) -> dict:
        """Change repo settings (private, gated) in place; the repo must exist."""
        with self.lock:
            path = self._repo_dir(repo_type, repo_id) / "repo.json"
            meta = json.loads(path.read_text()) | changes
            _atomic_write(path, json.dumps(meta).encode())
            return meta

    def delete_repo(self, repo_type: str, repo_id: str) -> bool:
        """Remove a repo (its commits and refs; blobs stay, shared by content). False if it does not exist."""
        import shutil

        with self.lock:
            d = self._repo_dir(repo_type, repo_id)
            if not (d / "repo.json").is_file():
                return False
            trash = d.with_name(f".deleted-{d.name}-{time.monotonic_ns()}")
            d.rename(trash)  # gone from view at once; the files after
            shutil.rmtree(trash, ignore_errors=True)
            return True

    def list_repos(self, repo_type: str) -> list[str]:
        base = self.root / "repos" / repo_type
        if not base.is_dir():
            return []
        return sorted(
            f"{ns.name}/{r.name}" for ns in base.iterdir() for r in ns.iterdir() if (r / "repo.json").is_file()
        )

    # --- commits -----------------------------------------------------------------------------
    def refs(self, repo_type: str, repo_id: str) -> dict:
        path = self._repo_dir(repo_type, repo_id) / "refs.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> str:
        check_revision(revision)
        refs = self.refs(repo_type, repo_id)
        if revision in refs:
            return refs[revision]
        if (
            re.fullmatch(r"[0-9a-f]{40}", revision)
            and (self._repo_dir(repo_type, repo_id) / "commits" / f"{revision}.json").is_file()
        ):
            return revision
        raise StoreError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def commit_info(self, repo_type: str, repo_id: str, oid: str) -> dict:
        return json.loads((self._repo_dir(repo_type, repo_id) / "commits" / f"{oid}.json").read_text())

    def files(self, repo_type: str, repo_id: str, oid: str) -> dict[str, FileEntry]:
        return {p: FileEntry(**e) for p, e in self.commit_info(repo_type, repo_id, oid)["files"].items()}

    def _write_commit(self, repo_type, repo_id, parent, message, files: dict[str, FileEntry], branch="main") -> str:
        body = {
            "parent": parent,
            "message": message,
            "date": _now(),
            "files": {p: e.as_json() for p, e in sorted(files.items())},
        }
        raw = json.dumps(body, sort_keys=True).encode()
        oid = hashlib.sha1(raw).hexdigest()
        d = self._repo_dir(repo_type, repo_id)
        _atomic_write(d / "commits" / f"{oid}.json", raw)
        refs = self.refs(repo_type, repo_id)
        refs[branch] = oid
        _atomic_write(d / "refs.json", json.dumps(refs).encode())  # the commit becomes visible here, atomically
        return oid

    def commit(
        self,
        repo_type: str,
        repo_id: str,
        branch: str,
        message: str,
        adds: dict[str, FileEntry],
        deletes: list[str],
        delete_folders: list[str],
        parent_commit: str | None = None,
    ) -> str:
        """Apply one commit on top of `branch`; all objects must already be stored."""
        with self.lock:
            head = self.resolve(repo_type, repo_id, branch)
            if parent_commit and parent_commit != head:
                raise StoreError(412, "ParentCommitMismatch", "parentCommit is not the head of the branch")
            files = self.files(repo_type, repo_id, head)
            for path in deletes:
                if files.pop(path, None) is None:
                    raise StoreError(404, "EntryNotFound", f"cannot delete {path}: not in the repo")
            for folder in delete_folders:
                prefix = folder.rstrip("/") + "/"
                for p in [p for p in files if p.startswith(prefix)]:
                    del files[p]
            for path, entry in adds.items():
                if not self.has_object(entry.sha256):
                    raise StoreError(422, "BadRequest", f"content of {path} was never uploaded")
                files[path] = entry
            return self._write_commit(repo_type, repo_id, head, message, files, branch)

    def history(self, repo_type: str, repo_id: str, revision: str = "main") -> list[dict]:
        oid = self.resolve(repo_type, repo_id, revision)
        out = []
        while oid:
            info = self.commit_info(repo_type, repo_id, oid)
            out.append({"id": oid, "title": info["message"], "date": info["date"]})
            oid = info["parent"]
        return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
