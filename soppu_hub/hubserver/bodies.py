"""Untrusted input to the offline Hub, checked before anything is stored: body sizes, JSON, NDJSON commits, paths.

Every refusal is a StoreError with a 4xx status and a message that says what was wrong, so a hostile or broken
client gets an answer huggingface_hub can show, never a 500 and never a half-applied commit.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field

from fastapi import Request

from .storage import StoreError, check_path

MAX_JSON_BYTES = 16 * 1024 * 1024  # create_repo, preupload, LFS batch: metadata only
MAX_COMMIT_BYTES = 128 * 1024 * 1024  # NDJSON commits carry regular (non-LFS, < 10 MB) files inline
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
COMMIT_KEYS = ("header", "file", "lfsFile", "deletedFile", "deletedFolder")


def _bad(message: str) -> StoreError:
    return StoreError(400, "BadRequest", message)


async def read_limited(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it (or its declared Content-Length) passes `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise _bad("invalid Content-Length header")
        if int(declared) > limit:
            raise StoreError(413, "PayloadTooLarge", f"request body of {declared} bytes is over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise StoreError(413, "PayloadTooLarge", f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_object(request: Request, limit: int = MAX_JSON_BYTES) -> dict:
    try:
        body = json.loads(await read_limited(request, limit))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _bad("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    return body


@dataclass
class CommitRequest:
    """One NDJSON commit, fully parsed: nothing is stored until every line has been checked."""

    summary: str = "commit"
    parent_commit: str | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # regular files, decoded
    lfs_files: dict[str, tuple[str, int]] = field(default_factory=dict)  # path -> (sha256, size)
    deletes: list[str] = field(default_factory=list)
    delete_folders: list[str] = field(default_factory=list)


def parse_commit(raw: bytes) -> CommitRequest:
    """huggingface_hub's commit body: one JSON object per line, `{"key": ..., "value": {...}}`."""
    out, seen_header = CommitRequest(), False
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _bad(f"commit line {n} is not valid JSON") from None
        if not isinstance(item, dict) or item.get("key") not in COMMIT_KEYS or not isinstance(item.get("value"), dict):
            raise _bad(f'commit line {n} must be {{"key": one of {", ".join(COMMIT_KEYS)}, "value": {{...}}}}')
        key, value = item["key"], item["value"]
        if key == "header":
            if seen_header:
                raise _bad(f"commit line {n}: a second header")
            seen_header = True
            summary, parent = value.get("summary"), value.get("parentCommit")
            if (
                summary is not None
                and not isinstance(summary, str)
                or parent is not None
                and not isinstance(parent, str)
            ):
                raise _bad(f"commit line {n}: summary and parentCommit must be strings")
            out.summary, out.parent_commit = (summary or "commit")[:1000], parent or None
            continue
        path = value.get("path")
        if key == "deletedFolder" and isinstance(path, str) and path.endswith("/"):
            path = path[:-1]
        path = check_path(path)
        if path in out.files or path in out.lfs_files:
            raise _bad(f"commit line {n}: {path!r} appears twice")
        if key == "file":
            content, encoding = value.get("content"), value.get("encoding", "base64")
            if not isinstance(content, str) or encoding not in ("base64", "utf-8"):
                raise _bad(f"commit line {n}: file content must be a string with encoding base64 or utf-8")
            try:
                out.files[path] = base64.b64decode(content, validate=True) if encoding == "base64" else content.encode()
            except (binascii.Error, ValueError):
                raise _bad(f"commit line {n}: content of {path!r} is not valid base64") from None
        elif key == "lfsFile":
            oid, size = value.get("oid"), value.get("size")
            if (
                not isinstance(oid, str)
                or not _SHA256.match(oid)
                or isinstance(size, bool)
                or not isinstance(size, int)
                or size < 0
            ):
                raise _bad(f"commit line {n}: lfsFile needs a sha256 oid and a size in bytes")
            out.lfs_files[path] = (oid, size)
        elif key == "deletedFile":
            out.deletes.append(path)
        else:
            out.delete_folders.append(path)
    if not seen_header:
        raise _bad("commit body has no header line")
    return out
