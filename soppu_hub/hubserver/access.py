"""Who may see and write what on the offline Hub, and a repo's info as huggingface_hub reads it."""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml
from fastapi import Request
from fastapi.responses import JSONResponse

from .bodies import MAX_COMMIT_BYTES
from .storage import FileEntry, Store, StoreError

KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


@dataclass
class Auth:
    """Bearer tokens -> user names, and organisations -> members."""

    tokens: dict[str, str] = field(default_factory=dict)
    orgs: dict[str, list[str]] = field(default_factory=dict)

    def user(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return self.tokens.get(header[7:].strip())
        return None

    def can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or user in self.orgs.get(namespace, []))


def error(status: int, code: str, message: str) -> JSONResponse:
    """An error as the Hub gives it: JSON body plus X-Error-Code / X-Error-Message, which huggingface_hub maps."""
    return JSONResponse(
        {"error": message}, status_code=status, headers={"X-Error-Code": code, "X-Error-Message": message}
    )


@dataclass
class Hub:
    """What every route needs: the store, the users, the public URL, and the access rules over them."""

    store: Store
    auth: Auth
    public_url: str
    max_commit_bytes: int = MAX_COMMIT_BYTES
    tickets: dict[str, tuple[str, int]] = field(default_factory=dict)  # one-time LFS upload tickets -> (oid, size)

    def visible(self, request: Request, kind: str, repo_id: str) -> dict:
        meta = self.store.repo_meta(kind, repo_id)
        user = self.auth.user(request)
        if meta is None or (meta["private"] and not self.auth.can_write(user, repo_id.split("/")[0])):
            status = 401 if user is None else 404
            raise StoreError(status, "RepoNotFound", f"Repository not found: {repo_id}")
        return meta

    def readable_files(self, request: Request, kind: str, repo_id: str) -> dict:
        """visible(), and for a gated repo also a user with access (here: its owners; access requests do not exist)."""
        meta = self.visible(request, kind, repo_id)
        if meta.get("gated") and not self.auth.can_write(self.auth.user(request), repo_id.split("/")[0]):
            raise StoreError(403, "GatedRepo", f"Access to model {repo_id} is restricted; you must be granted access")
        return meta

    def writable(self, request: Request, kind: str, repo_id: str) -> str:
        user = self.auth.user(request)
        if user is None:
            raise StoreError(401, "Unauthorized", "Invalid credentials in Authorization header")
        self.visible(request, kind, repo_id)
        if not self.auth.can_write(user, repo_id.split("/")[0]):
            raise StoreError(403, "Forbidden", f"You don't have the rights to write to {repo_id}")
        return user

    def card_data(self, kind: str, repo_id: str, oid: str, files: dict[str, FileEntry]) -> dict | None:
        entry = files.get("README.md")
        if entry is None:
            return None
        text = self.store.read_object(entry.sha256).decode("utf-8", "replace")
        if not text.startswith("---"):
            return None
        try:
            data = yaml.safe_load(text.split("---", 2)[1])
        except yaml.YAMLError:
            return None
        return data if isinstance(data, dict) else None

    def repo_info(self, request: Request, kind: str, repo_id: str, revision: str) -> dict:
        meta = self.visible(request, kind, repo_id)
        oid = self.store.resolve(kind, repo_id, revision)
        files = self.store.files(kind, repo_id, oid)
        card = self.card_data(kind, repo_id, oid, files)
        tags = list(card.get("tags") or []) if card else []
        info = {
            "_id": repo_id,
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": oid,
            "private": meta["private"],
            "disabled": False,
            "gated": meta.get("gated", False),
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "cardData": card,
            "createdAt": meta["created"],
            "lastModified": self.store.commit_info(kind, repo_id, oid)["date"],
            "siblings": [{"rfilename": p} for p in sorted(files)],
        }
        if kind == "model":
            info["modelId"] = repo_id
            info["library_name"] = (card or {}).get("library_name")
            info["pipeline_tag"] = (card or {}).get("pipeline_tag")
        return info
