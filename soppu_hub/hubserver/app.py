"""The offline Hub as one FastAPI app: its routes as huggingface_hub calls them (see shared/HubProtocol.md)."""

from __future__ import annotations

from fastapi import FastAPI, Request

from .access import Auth, Hub, error
from .bodies import MAX_COMMIT_BYTES
from .routes_download import download_routes
from .routes_repos import repo_routes
from .routes_upload import upload_routes
from .storage import Store, StoreError

__all__ = ["Auth", "create_app"]


def create_app(store: Store, auth: Auth, public_url: str, *, max_commit_bytes: int = MAX_COMMIT_BYTES) -> FastAPI:
    app = FastAPI(title="soppu-hub offline Hub", docs_url=None, redoc_url=None, openapi_url=None)
    hub = Hub(store, auth, public_url, max_commit_bytes)

    @app.exception_handler(StoreError)
    async def store_error(_: Request, e: StoreError):
        return error(e.status, e.code, e.message)

    for routes in (repo_routes, upload_routes, download_routes):  # in this order: /{ns}/{name} matches last
        app.include_router(routes(hub))
    return app
