"""A small Hub-compatible HTTP server for offline use: the demo's default Hub and the tests' real server.

The compression path never imports this package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError
from .app import Auth, create_app
from .bodies import MAX_COMMIT_BYTES
from .storage import Store

__all__ = ["USERS_ENV", "Auth", "Store", "create_app", "load_auth", "serve"]


USERS_ENV = "SOPPU_HUB_USERS"  # the users JSON in the environment: tokens neither on disk nor in the process list


def load_auth(
    users: list[str] | None = None, orgs: list[str] | None = None, users_file: str | Path | None = None
) -> Auth:
    """Users as 'name:token' strings, a JSON file and/or $SOPPU_HUB_USERS, each {"users": {name: token},
    "orgs": {org: [members]}}."""
    auth = Auth()
    sources = [Path(users_file).read_text()] if users_file else []
    if os.environ.get(USERS_ENV):
        sources.append(os.environ[USERS_ENV])
    for text in sources:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(
                f'users must be JSON {{"users": {{name: token}}, "orgs": {{org: [members]}}}} '
                f"(in --users-file or ${USERS_ENV})"
            ) from None
        auth.tokens.update({tok: name for name, tok in data.get("users", {}).items()})
        auth.orgs.update(data.get("orgs", {}))
    for spec in users or []:
        name, _, token = spec.partition(":")
        if not name or not token:
            raise ConfigError(f"--user must be NAME:TOKEN, got {spec!r}")
        auth.tokens[token] = name
    for spec in orgs or []:
        org, _, members = spec.partition(":")
        auth.orgs[org] = [m for m in members.split(",") if m]
    return auth


def serve(
    root: str | Path,
    auth: Auth,
    host: str = "127.0.0.1",
    port: int = 8900,
    public_url: str | None = None,
    max_commit_bytes: int = MAX_COMMIT_BYTES,
) -> None:
    import uvicorn

    app = create_app(Store(root), auth, public_url or f"http://{host}:{port}", max_commit_bytes=max_commit_bytes)
    uvicorn.run(app, host=host, port=port, log_level="warning")
