"""The offline Hub's upload routes: preupload, LFS batch and one-time upload tickets, NDJSON commits."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from huggingface_hub.utils.sha import git_hash

from .access import KINDS, PREFIX, Hub, error
from .bodies import json_object, parse_commit, read_limited
from .storage import FileEntry, check_path

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".png", ".jpg", ".gguf", ".onnx", ".h5", ".msgpack", ".zip")
LFS_MIN_SIZE = 10 * 1024 * 1024


def upload_routes(hub: Hub) -> APIRouter:
    router = APIRouter()
    store, public_url, tickets, writable = hub.store, hub.public_url, hub.tickets, hub.writable

    # --- upload: preupload, LFS batch + PUT, commit ---------------------------------------------
    @router.post("/api/{kinds}/{ns}/{name}/preupload/{revision:path}")
    async def preupload(kinds: str, ns: str, name: str, revision: str, request: Request):
        kind = KINDS.get(kinds, "?")
        writable(request, kind, f"{ns}/{name}")
        files = (await json_object(request)).get("files", [])
        if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
            return error(400, "BadRequest", "files must be a list of {path, size, sample}")
        out = []
        for f in files:
            path, size = check_path(f.get("path")), f.get("size", 0)
            lfs = path.lower().endswith(LFS_SUFFIXES) or (isinstance(size, int) and size >= LFS_MIN_SIZE)
            out.append({"path": path, "shouldIgnore": False, "uploadMode": "lfs" if lfs else "regular"})
        return {"files": out, "commitOid": store.resolve(kind, f"{ns}/{name}", revision)}

    async def lfs_batch(kind: str, repo_id: str, request: Request):
        writable(request, kind, repo_id)
        objects, asked = [], (await json_object(request)).get("objects", [])
        if not isinstance(asked, list) or not all(
            isinstance(o, dict) and isinstance(o.get("oid"), str) and type(o.get("size")) is int and o["size"] >= 0
            for o in asked
        ):
            return error(400, "BadRequest", "objects must be a list of {oid, size}")
        for obj in asked:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not store.has_object(obj["oid"]):
                ticket = secrets.token_urlsafe(24)
                tickets[ticket] = (obj["oid"], obj["size"])
                item["actions"] = {"upload": {"href": f"{public_url}/lfs-upload/{ticket}", "expires_in": 3600}}
            objects.append(item)
        return JSONResponse({"transfer": "basic", "objects": objects}, media_type="application/vnd.git-lfs+json")

    @router.post("/{ns}/{name}.git/info/lfs/objects/batch")
    async def lfs_batch_model(ns: str, name: str, request: Request):
        return await lfs_batch("model", f"{ns}/{name}", request)

    @router.post("/{kinds}/{ns}/{name}.git/info/lfs/objects/batch")
    async def lfs_batch_other(kinds: str, ns: str, name: str, request: Request):
        return await lfs_batch(KINDS.get(kinds, "?"), f"{ns}/{name}", request)

    @router.put("/lfs-upload/{ticket}")
    async def lfs_upload(ticket: str, request: Request):
        # huggingface_hub sends no auth header here: the ticket in the URL is the authorisation. Like a presigned
        # URL it stays valid for its object: a client that retries a PUT (its first attempt timed out on a busy
        # server) must not be refused for the retry.
        if ticket not in tickets:
            return error(403, "Forbidden", "unknown upload ticket")
        oid, size = tickets[ticket]
        data = await read_limited(request, size)
        if len(data) != size:
            return error(400, "BadRequest", f"expected {size} bytes, got {len(data)}")
        if not store.has_object(oid):
            store.put_object(data, expected_sha256=oid)
        return Response(status_code=200)

    @router.post("/api/{kinds}/{ns}/{name}/commit/{revision:path}")
    async def commit(kinds: str, ns: str, name: str, revision: str, request: Request):
        kind, repo_id = KINDS.get(kinds, "?"), f"{ns}/{name}"
        writable(request, kind, repo_id)
        parsed = parse_commit(
            await read_limited(request, hub.max_commit_bytes)
        )  # all checked before anything is stored
        for oid, _ in parsed.lfs_files.values():
            if not store.has_object(oid):
                return error(422, "BadRequest", f"LFS object {oid} was never uploaded")
        adds = {}
        for path, raw in parsed.files.items():
            adds[path] = FileEntry(store.put_object(raw), len(raw), git_hash(raw), False)
        for path, (
            oid,
            size,
        ) in parsed.lfs_files.items():  # a pointer's blob id, as git would hash the LFS pointer file
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()
            adds[path] = FileEntry(oid, size, git_hash(pointer), True)
        oid = store.commit(
            kind, repo_id, revision, parsed.summary, adds, parsed.deletes, parsed.delete_folders, parsed.parent_commit
        )
        return {
            "commitOid": oid,
            "commitUrl": f"{public_url}/{PREFIX[kind]}{repo_id}/commit/{oid}",
            "pullRequestUrl": None,
        }

    return router
