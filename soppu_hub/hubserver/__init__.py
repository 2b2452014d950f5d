"""A small Hub-compatible HTTP server for offline use: the demo's default Hub and the tests' real server.

The compression path never imports this package.
"""

from __future__ import annotations

import json
from pathlib import Path

from .app import Auth, create_app
from .storage import Store

__all__ = ["Auth", "Store", "create_app", "load_auth", "serve"]


def load_auth(users: list[str] | None = None, orgs: list[str] | None = None, users_file: str | Path | None = None) -> Auth:
    """Users as 'name:token' strings and/or a JSON file {"users": {name: token}, "orgs": {org: [members]}}."""
    auth = Auth()
    if users_file:
        data = json.loads(Path(users_file).read_text())
        auth.tokens.update({tok: name for name, tok in data.get("users", {}).items()})
        auth.orgs.update(data.get("orgs", {}))
    for spec in users or []:
        name, _, token = spec.partition(":")
        if not name or not token:
            raise ValueError(f"--user must be NAME:TOKEN, got {spec!r}")
        auth.tokens[token] = name
    for spec in orgs or []:
        org, _, members = spec.partition(":")
        auth.orgs[org] = [m for m in members.split(",") if m]
    return auth


def serve(root: str | Path, auth: Auth, host: str = "127.0.0.1", port: int = 8900, public_url: str | None = None) -> None:
    import uvicorn

    app = create_app(Store(root), auth, public_url or f"http://{host}:{port}")
    uvicorn.run(app, host=host, port=port, log_level="warning")
