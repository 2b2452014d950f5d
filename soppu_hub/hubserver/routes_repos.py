"""The offline Hub's identity and repo routes: whoami, create / delete / settings, listings, info, history, tree."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .access import KINDS, PREFIX, Hub, error
from .bodies import json_object
from .storage import StoreError, check_path


def repo_routes(hub: Hub) -> APIRouter:
    router = APIRouter()
    store, auth, public_url = hub.store, hub.auth, hub.public_url
    visible, writable, repo_info = hub.visible, hub.writable, hub.repo_info

    # --- identity and repos --------------------------------------------------------------------
    @router.get("/api/whoami-v2")
    async def whoami(request: Request):
        user = auth.user(request)
        if user is None:
            return error(401, "Unauthorized", "Invalid user token.")
        orgs = [{"name": o, "type": "org", "roleInOrg": "write"} for o, members in auth.orgs.items() if user in members]
        return {
            "type": "user",
            "name": user,
            "fullname": user,
            "orgs": orgs,
            "auth": {"type": "access_token", "accessToken": {"displayName": "offline", "role": "write"}},
        }

    @router.post("/api/repos/create")
    async def create_repo(request: Request):
        user = auth.user(request)
        if user is None:
            return error(401, "Unauthorized", "Invalid credentials in Authorization header")
        body = await json_object(request)
        namespace, name, kind = body.get("organization") or user, body.get("name"), body.get("type") or "model"
        if not isinstance(namespace, str) or not isinstance(name, str) or kind not in PREFIX:
            return error(
                400, "BadRequest", "name and organization must be strings and type one of model, dataset, space"
            )
        repo_id = f"{namespace}/{name}"
        store.check_repo_id(kind, repo_id)
        if not auth.can_write(user, namespace):
            return error(403, "Forbidden", f"You don't have the rights to create a repo under {namespace}")
        private = bool(body.get("private")) or body.get("visibility") == "private"
        url = f"{public_url}/{PREFIX.get(kind, '')}{repo_id}"
        if not store.create_repo(kind, repo_id, private):
            return JSONResponse({"error": "You already created this repo", "url": url}, status_code=409)
        return {"url": url, "name": repo_id}

    @router.delete("/api/repos/delete")
    async def delete_repo(request: Request):
        body = await json_object(request)
        user = auth.user(request)
        if user is None:
            return error(401, "Unauthorized", "Invalid credentials in Authorization header")
        namespace, name, kind = body.get("organization") or user, body.get("name"), body.get("type") or "model"
        if not isinstance(namespace, str) or not isinstance(name, str) or kind not in PREFIX:
            return error(
                400, "BadRequest", "name and organization must be strings and type one of model, dataset, space"
            )
        repo_id = f"{namespace}/{name}"
        writable(request, kind, repo_id)
        store.delete_repo(kind, repo_id)
        return {}

    @router.put("/api/{kinds}/{ns}/{name}/settings")
    async def settings(kinds: str, ns: str, name: str, request: Request):
        kind, repo_id = KINDS.get(kinds, "?"), f"{ns}/{name}"
        writable(request, kind, repo_id)
        body, changes = await json_object(request), {}
        if "gated" in body:
            if body["gated"] not in ("auto", "manual", False):
                return error(400, "BadRequest", "gated must be 'auto', 'manual' or false")
            changes["gated"] = body["gated"]
        if "private" in body:
            if not isinstance(body["private"], bool):
                return error(400, "BadRequest", "private must be true or false")
            changes["private"] = body["private"]
        store.update_meta(kind, repo_id, **changes)
        return {}

    @router.post("/api/validate-yaml")
    async def validate_yaml():
        return {"errors": [], "warnings": []}

    @router.get("/api/{kinds}")
    async def list_repos(
        kinds: str,
        request: Request,
        author: str | None = None,
        search: str | None = None,
        filter: list[str] | None = None,
        limit: int | None = None,
    ):
        kind = KINDS.get(kinds)
        if kind is None:
            return error(404, "NotFound", f"unknown listing {kinds}")
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
            out.append(
                {
                    k: info[k]
                    for k in (
                        "_id",
                        "id",
                        "author",
                        "sha",
                        "private",
                        "tags",
                        "downloads",
                        "likes",
                        "createdAt",
                        "lastModified",
                    )
                    if k in info
                }
                | ({"modelId": repo_id, "library_name": info.get("library_name")} if kind == "model" else {})
            )
        return out[:limit] if limit else out

    @router.get("/api/{kinds}/{ns}/{name}")
    async def info(kinds: str, ns: str, name: str, request: Request):
        return repo_info(request, KINDS.get(kinds, "?"), f"{ns}/{name}", "main")

    @router.get("/api/{kinds}/{ns}/{name}/revision/{revision:path}")
    async def info_rev(kinds: str, ns: str, name: str, revision: str, request: Request):
        return repo_info(request, KINDS.get(kinds, "?"), f"{ns}/{name}", revision)

    @router.get("/api/{kinds}/{ns}/{name}/commits/{revision:path}")
    async def commits(kinds: str, ns: str, name: str, revision: str, request: Request):
        kind = KINDS.get(kinds, "?")
        visible(request, kind, f"{ns}/{name}")
        return [
            {"id": c["id"], "title": c["title"], "message": "", "authors": [], "date": c["date"]}
            for c in store.history(kind, f"{ns}/{name}", revision)
        ]

    @router.get("/api/{kinds}/{ns}/{name}/tree/{revision}")
    @router.get("/api/{kinds}/{ns}/{name}/tree/{revision}/{path:path}")
    async def tree(
        kinds: str, ns: str, name: str, revision: str, request: Request, path: str = "", recursive: bool = False
    ):
        kind, repo_id = KINDS.get(kinds, "?"), f"{ns}/{name}"
        visible(request, kind, repo_id)
        files = store.files(kind, repo_id, store.resolve(kind, repo_id, revision))
        prefix = check_path(path.strip("/"), "folder") + "/" if path.strip("/") else ""
        entries, dirs = [], set()
        for p, e in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :]
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
            return error(404, "EntryNotFound", f"{path} does not exist")
        return [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)] + entries

    return router
