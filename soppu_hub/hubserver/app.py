"""HTTP routes of the offline Hub, as huggingface_hub calls them (see shared/HubProtocol.md)."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .bodies import MAX_COMMIT_BYTES, json_object, parse_commit, read_limited
from .storage import FileEntry, Store, StoreError, check_path, git_blob_sha1

KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}
PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".png", ".jpg", ".gguf", ".onnx", ".h5", ".msgpack", ".zip")
LFS_MIN_SIZE = 10 * 1024 * 1024


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


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"X-Error-Code": code, "X-Error-Message": message})


def create_app(store: Store, auth: Auth, public_url: str, *, max_commit_bytes: int = MAX_COMMIT_BYTES) -> FastAPI:
    app = FastAPI(title="soppu-hub offline Hub", docs_url=None, redoc_url=None, openapi_url=None)
    tickets: dict[str, tuple[str, int]] = {}  # one-time LFS upload tickets -> (oid, size)

    @app.exception_handler(StoreError)
    async def store_error(_: Request, e: StoreError):
        return _error(e.status, e.code, e.message)

    def visible(request: Request, kind: str, repo_id: str) -> dict:
        meta = store.repo_meta(kind, repo_id)
        user = auth.user(request)
        if meta is None or (meta["private"] and not auth.can_write(user, repo_id.split("/")[0])):
            status = 401 if user is None else 404
            raise StoreError(status, "RepoNotFound", f"Repository not found: {repo_id}")
        return meta

    def readable_files(request: Request, kind: str, repo_id: str) -> dict:
        """visible(), and for a gated repo also a user with access (here: its owners; access requests do not exist)."""
        meta = visible(request, kind, repo_id)
        if meta.get("gated") and not auth.can_write(auth.user(request), repo_id.split("/")[0]):
            raise StoreError(403, "GatedRepo", f"Access to model {repo_id} is restricted; you must be granted access")
        return meta

    def writable(request: Request, kind: str, repo_id: str) -> str:
        user = auth.user(request)
        if user is None:
            raise StoreError(401, "Unauthorized", "Invalid credentials in Authorization header")
        visible(request, kind, repo_id)
        if not auth.can_write(user, repo_id.split("/")[0]):
            raise StoreError(403, "Forbidden", f"You don't have the rights to write to {repo_id}")
        return user

    def card_data(kind: str, repo_id: str, oid: str, files: dict[str, FileEntry]) -> dict | None:
        entry = files.get("README.md")
        if entry is None:
            return None
        text = store.read_object(entry.sha256).decode("utf-8", "replace")
        if not text.startswith("---"):
            return None
        try:
            data = yaml.safe_load(text.split("---", 2)[1])
        except yaml.YAMLError:
            return None
        return data if isinstance(data, dict) else None

    def repo_info(request: Request, kind: str, repo_id: str, revision: str) -> dict:
        meta = visible(request, kind, repo_id)
        oid = store.resolve(kind, repo_id, revision)
        files = store.files(kind, repo_id, oid)
        card = card_data(kind, repo_id, oid, files)
        tags = list(card.get("tags") or []) if card else []
        info = {
            "_id": repo_id, "id": repo_id, "author": repo_id.split("/")[0], "sha": oid, "private": meta["private"],
            "disabled": False, "gated": meta.get("gated", False), "downloads": 0, "likes": 0, "tags": tags, "cardData": card,
            "createdAt": meta["created"], "lastModified": store.commit_info(kind, repo_id, oid)["date"],
            "siblings": [{"rfilename": p} for p in sorted(files)],
        }
        if kind == "model":
            info["modelId"] = repo_id
            info["library_name"] = (card or {}).get("library_name")
            info["pipeline_tag"] = (card or {}).get("pipeline_tag")
        return info

    # --- identity and repos --------------------------------------------------------------------
    @app.get("/api/whoami-v2")
    async def whoami(request: Request):
        user = auth.user(request)
        if user is None:
            return _error(401, "Unauthorized", "Invalid user token.")
        orgs = [{"name": o, "type": "org", "roleInOrg": "write"} for o, members in auth.orgs.items() if user in members]
        return {"type": "user", "name": user, "fullname": user, "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": {"displayName": "offline", "role": "write"}}}

    @app.post("/api/repos/create")
    async def create_repo(request: Request):
        user = auth.user(request)
        if user is None:
            return _error(401, "Unauthorized", "Invalid credentials in Authorization header")
        body = await json_object(request)
        namespace, name, kind = body.get("organization") or user, body.get("name"), body.get("type") or "model"
        if not isinstance(namespace, str) or not isinstance(name, str) or kind not in PREFIX:
            return _error(400, "BadRequest", "name and organization must be strings and type one of model, dataset, space")
        repo_id = f"{namespace}/{name}"
        store.check_repo_id(kind, repo_id)
        if not auth.can_write(user, namespace):
            return _error(403, "Forbidden", f"You don't have the rights to create a repo under {namespace}")
        private = bool(body.get("private")) or body.get("visibility") == "private"
        url = f"{public_url}/{PREFIX.get(kind, '')}{repo_id}"
        if not store.create_repo(kind, repo_id, private):
            return JSONResponse({"error": "You already created this repo", "url": url}, status_code=409)
        return {"url": url, "name": repo_id}

    @app.delete("/api/repos/delete")
    async def delete_repo(request: Request):
        body = await json_object(request)
        user = auth.user(request)
        if user is None:
            return _error(401, "Unauthorized", "Invalid credentials in Authorization header")
        namespace, name, kind = body.get("organization") or user, body.get("name"), body.get("type") or "model"
        if not isinstance(namespace, str) or not isinstance(name, str) or kind not in PREFIX:
            return _error(400, "BadRequest", "name and organization must be strings and type one of model, dataset, space")
        repo_id = f"{namespace}/{name}"
        writable(request, kind, repo_id)
        store.delete_repo(kind, repo_id)
        return {}

    @app.put("/api/{kinds}/{ns}/{name}/settings")
    async def settings(kinds: str, ns: str, name: str, request: Request):
        kind, repo_id = KINDS.get(kinds, "?"), f"{ns}/{name}"
        writable(request, kind, repo_id)
        body, changes = await json_object(request), {}
        if "gated" in body:
            if body["gated"] not in ("auto", "manual", False):
                return _error(400, "BadRequest", "gated must be 'auto', 'manual' or false")
            changes["gated"] = body["gated"]
        if "private" in body:
            if not isinstance(body["private"], bool):
                return _error(400, "BadRequest", "private must be true or false")
            changes["private"] = body["private"]
        store.update_meta(kind, repo_id, **changes)
        return {}

    @app.post("/api/validate-yaml")
    async def validate_yaml():
        return {"errors": [], "warnings": []}

    @app.get("/api/{kinds}")
    async def list_repos(kinds: str, request: Request, author: str | None = None, search: str | None = None,
                         filter: list[str] | None = None, limit: int | None = None):
        kind = KINDS.get(kinds)
        if kind is None:
            return _error(404, "NotFound", f"unknown listing {kinds}")
        filters = set(request.query_params.getlist("filter"))
        out = []
        for repo_id in store.list_repos(kind):
            if author and repo_id.split("/")[0] != author:
                continue
            if search and search.lower() not in repo_id.lower():
                continue
            try:
                info = repo_info(request, kind, repo_id, "main")
            except StoreError:
                continue  # private and not ours
            if filters and not filters.issubset(set(info["tags"]) | {info.get("library_name")}):
                continue
            out.append({k: info[k] for k in ("_id", "id", "author", "sha", "private", "tags", "downloads", "likes",
                                             "createdAt", "lastModified") if k in info}
                       | ({"modelId": repo_id, "library_name": info.get("library_name")} if kind == "model" else {}))
        return out[:limit] if limit else out

    @app.get("/api/{kinds}/{ns}/{name}")
    async def info(kinds: str, ns: str, name: str, request: Request):
        return repo_info(request, KINDS.get(kinds, "?"), f"{ns}/{name}", "main")

    @app.get("/api/{kinds}/{ns}/{name}/revision/{revision:path}")
    async def info_rev(kinds: str, ns: str, name: str, revision: str, request: Request):
        return repo_info(request, KINDS.get(kinds, "?"), f"{ns}/{name}", revision)

    @app.get("/api/{kinds}/{ns}/{name}/commits/{revision:path}")
    async def commits(kinds: str, ns: str, name: str, revision: str, request: Request):
        kind = KINDS.get(kinds, "?")
        visible(request, kind, f"{ns}/{name}")
        return [{"id": c["id"], "title": c["title"], "message": "", "authors": [], "date": c["date"]}
                for c in store.history(kind, f"{ns}/{name}", revision)]

    @app.get("/api/{kinds}/{ns}/{name}/tree/{revision}")
    @app.get("/api/{kinds}/{ns}/{name}/tree/{revision}/{path:path}")
    async def tree(kinds: str, ns: str, name: str, revision: str, request: Request, path: str = "",
                   recursive: bool = False):
        kind, repo_id = KINDS.get(kinds, "?"), f"{ns}/{name}"
        visible(request, kind, repo_id)
        files = store.files(kind, repo_id, store.resolve(kind, repo_id, revision))
        prefix = check_path(path.strip("/"), "folder") + "/" if path.strip("/") else ""
        entries, dirs = [], set()
        for p, e in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            parts = rest.split("/")
            for i in range(1, len(parts)):
                if recursive or i == 1:
                    dirs.add(prefix + "/".join(parts[:i]))
            if not recursive and len(parts) > 1:
                continue
            item = {"type": "file", "oid": e.git_sha1, "size": e.size, "path": p}
            if e.lfs:
                item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": 134}
            entries.append(item)
        if prefix and not entries and not dirs:
            return _error(404, "EntryNotFound", f"{path} does not exist")
        return [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)] + entries

    # --- upload: preupload, LFS batch + PUT, commit ---------------------------------------------
    @app.post("/api/{kinds}/{ns}/{name}/preupload/{revision:path}")
    async def preupload(kinds: str, ns: str, name: str, revision: str, request: Request):
        kind = KINDS.get(kinds, "?")
        writable(request, kind, f"{ns}/{name}")
        files = (await json_object(request)).get("files", [])
        if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
            return _error(400, "BadRequest", "files must be a list of {path, size, sample}")
        out = []
        for f in files:
            path, size = check_path(f.get("path")), f.get("size", 0)
            lfs = path.lower().endswith(LFS_SUFFIXES) or (isinstance(size, int) and size >= LFS_MIN_SIZE)
            out.append({"path": path, "shouldIgnore": False, "uploadMode": "lfs" if lfs else "regular"})
        return {"files": out, "commitOid": store.resolve(kind, f"{ns}/{name}", revision)}

    async def lfs_batch(kind: str, repo_id: str, request: Request):
        writable(request, kind, repo_id)
        objects, asked = [], (await json_object(request)).get("objects", [])
        if not isinstance(asked, list) or not all(isinstance(o, dict) and isinstance(o.get("oid"), str)
                                                  and type(o.get("size")) is int and o["size"] >= 0 for o in asked):
            return _error(400, "BadRequest", "objects must be a list of {oid, size}")
        for obj in asked:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not store.has_object(obj["oid"]):
                ticket = secrets.token_urlsafe(24)
                tickets[ticket] = (obj["oid"], obj["size"])
                item["actions"] = {"upload": {"href": f"{public_url}/lfs-upload/{ticket}", "expires_in": 3600}}
            objects.append(item)
        return JSONResponse({"transfer": "basic", "objects": objects}, media_type="application/vnd.git-lfs+json")

    @app.post("/{ns}/{name}.git/info/lfs/objects/batch")
    async def lfs_batch_model(ns: str, name: str, request: Request):
        return await lfs_batch("model", f"{ns}/{name}", request)

    @app.post("/{kinds}/{ns}/{name}.git/info/lfs/objects/batch")
    async def lfs_batch_other(kinds: str, ns: str, name: str, request: Request):
        return await lfs_batch(KINDS.get(kinds, "?"), f"{ns}/{name}", request)

    @app.put("/lfs-upload/{ticket}")
    async def lfs_upload(ticket: str, request: Request):
        # huggingface_hub sends no auth header here: the one-time ticket in the URL is the authorisation.
        if ticket not in tickets:
            return _error(403, "Forbidden", "unknown or used upload ticket")
        oid, size = tickets.pop(ticket)
        data = await read_limited(request, size)
        if len(data) != size:
            return _error(400, "BadRequest", f"expected {size} bytes, got {len(data)}")
        store.put_object(data, expected_sha256=oid)
        return Response(status_code=200)

    @app.post("/api/{kinds}/{ns}/{name}/commit/{revision:path}")
    async def commit(kinds: str, ns: str, name: str, revision: str, request: Request):
        kind, repo_id = KINDS.get(kinds, "?"), f"{ns}/{name}"
        writable(request, kind, repo_id)
        parsed = parse_commit(await read_limited(request, max_commit_bytes))  # all checked before anything is stored
        for oid, _ in parsed.lfs_files.values():
            if not store.has_object(oid):
                return _error(422, "BadRequest", f"LFS object {oid} was never uploaded")
        adds = {}
        for path, raw in parsed.files.items():
            adds[path] = FileEntry(store.put_object(raw), len(raw), git_blob_sha1(raw), False)
        for path, (oid, size) in parsed.lfs_files.items():  # a pointer's blob id, as git would hash the LFS pointer file
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()
            adds[path] = FileEntry(oid, size, git_blob_sha1(pointer), True)
        oid = store.commit(kind, repo_id, revision, parsed.summary, adds, parsed.deletes, parsed.delete_folders,
                           parsed.parent_commit)
        return {"commitOid": oid, "commitUrl": f"{public_url}/{PREFIX[kind]}{repo_id}/commit/{oid}", "pullRequestUrl": None}

    # --- download ------------------------------------------------------------------------------
    async def resolve_file(kind: str, repo_id: str, revision: str, path: str, request: Request):
        readable_files(request, kind, repo_id)
        oid = store.resolve(kind, repo_id, revision)
        entry = store.files(kind, repo_id, oid).get(check_path(path))
        if entry is None:
            return _error(404, "EntryNotFound", f"{path} does not exist in {repo_id} at {revision}")
        headers = {"X-Repo-Commit": oid, "ETag": f'"{entry.git_sha1}"', "Content-Length": str(entry.size),
                   "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size), "ETag": f'"{entry.sha256}"'})
        if request.method == "HEAD":
            return Response(status_code=200, headers=headers)
        data = store.read_object(entry.sha256)
        rng = request.headers.get("range", "")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            start = int(m[1]) if m and m[1] else (len(data) - int(m[2]) if m and m[2] else -1)
            end = min(int(m[2]), len(data) - 1) if m and m[1] and m[2] else len(data) - 1
            if not m or start < 0 or start > end:
                return Response(status_code=416, headers={"Content-Range": f"bytes */{len(data)}"})
            headers.update({"Content-Range": f"bytes {start}-{end}/{len(data)}", "Content-Length": str(end - start + 1)})
            return Response(data[start : end + 1], status_code=206, headers=headers, media_type="application/octet-stream")
        return Response(data, headers=headers, media_type="application/octet-stream")

    @app.api_route("/{ns}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    async def resolve_model(ns: str, name: str, revision: str, path: str, request: Request):
        return await resolve_file("model", f"{ns}/{name}", revision, path, request)

    @app.api_route("/{kinds}/{ns}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    async def resolve_other(kinds: str, ns: str, name: str, revision: str, path: str, request: Request):
        return await resolve_file(KINDS.get(kinds, "?"), f"{ns}/{name}", revision, path, request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/{ns}/{name}")
    async def repo_page(ns: str, name: str, request: Request):
        """A person's view of a model repo: the card rendered to HTML, images served from the repo."""
        from fastapi.responses import HTMLResponse

        from .page import render_card_page

        repo_id = f"{ns}/{name}"
        visible(request, "model", repo_id)
        oid = store.resolve("model", repo_id, "main")
        files = store.files("model", repo_id, oid)
        readme = store.read_object(files["README.md"].sha256).decode("utf-8", "replace") if "README.md" in files else ""
        return HTMLResponse(render_card_page(repo_id, readme, sorted(files), f"/{repo_id}/resolve/{oid}/"))

    return app
