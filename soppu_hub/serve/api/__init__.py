"""The backend's HTTP APIs over one engine: LoRAX's REST API and OpenAI's /v1, with one error handler."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..engine import Engine
from ..errors import ServeError
from .lorax import lorax_routes
from .openai import openai_error, openai_routes


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="soppu-hub embedded LoRAX-compatible backend", docs_url=None, redoc_url=None)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, e: ServeError):
        if request.url.path.startswith("/v1/"):
            return JSONResponse(openai_error(e), status_code=e.status)
        return JSONResponse({"error": str(e), "error_type": e.error_type}, status_code=e.status)

    app.include_router(openai_routes(engine))
    app.include_router(lorax_routes(engine))
    return app
