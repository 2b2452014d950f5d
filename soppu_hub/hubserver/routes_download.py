"""The offline Hub's download routes: files by revision (HEAD, ranges, LFS ETags), the card as a page, health."""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .access import KINDS, Hub, error
from .storage import check_path


def download_routes(hub: Hub) -> APIRouter:
    router = APIRouter()
    store, visible, readable_files = hub.store, hub.visible, hub.readable_files

    # --- download ------------------------------------------------------------------------------
    async def resolve_file(kind: str, repo_id: str, revision: str, path: str, request: Request):
        readable_files(request, kind, repo_id)
        oid = store.resolve(kind, repo_id, revision)
        entry = store.files(kind, repo_id, oid).get(check_path(path))
        if entry is None:
            return error(404, "EntryNotFound", f"{path} does not exist in {repo_id} at {revision}")
        headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{entry.git_sha1}"',
            "Content-Length": str(entry.size),
            "Accept-Ranges": "bytes",
        }
        if entry.lfs:
            headers.update(
                {"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size), "ETag": f'"{entry.sha256}"'}
            )
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
            headers.update(
                {"Content-Range": f"bytes {start}-{end}/{len(data)}", "Content-Length": str(end - start + 1)}
            )
            return Response(
                data[start : end + 1], status_code=206, headers=headers, media_type="application/octet-stream"
            )
        return Response(data, headers=headers, media_type="application/octet-stream")

    @router.api_route("/{ns}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    async def resolve_model(ns: str, name: str, revision: str, path: str, request: Request):
        return await resolve_file("model", f"{ns}/{name}", revision, path, request)

    @router.api_route("/{kinds}/{ns}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    async def resolve_other(kinds: str, ns: str, name: str, revision: str, path: str, request: Request):
        return await resolve_file(KINDS.get(kinds, "?"), f"{ns}/{name}", revision, path, request)

    @router.get("/health")
    async def health():
        return {"status": "ok"}

    @router.get("/")
    async def front_page(request: Request):
        """A person's view of the Hub: the model repos this caller may see, newest first, each linking to its page."""
        from fastapi.responses import HTMLResponse

        from .page import render_repo_list

        seen = []
        for repo_id in store.list_repos("model"):
            try:
                info = hub.repo_info(request, "model", repo_id, "main")
            except Exception:  # noqa: BLE001 - private and not ours, or empty: not listed
                continue
            seen.append((repo_id, info.get("lastModified") or "", info.get("tags") or []))
        seen.sort(key=lambda r: r[1], reverse=True)
        return HTMLResponse(render_repo_list(seen, str(request.base_url).rstrip("/")))

    @router.get("/{ns}/{name}")
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

    return router
