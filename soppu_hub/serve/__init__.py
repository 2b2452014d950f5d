"""The embedded LoRAX-compatible CPU backend (`soppu-hub serve`). The compression path never imports it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing the package must not pull the engine in: adapters.py and params.py stand alone
    from .engine import Engine


def build_engine(model: str, *, max_adapters: int = 8, max_batch: int = 16, max_total_tokens: int | None = None,
                 max_concurrent_requests: int = 128, adapter_dir: str | None = None, token: str | None = None,
                 share_bases: bool = True) -> "Engine":
    from ..hub.pull import model_folder
    from .engine import Engine

    folder = model_folder(model, token=token)
    return Engine(folder, model, max_adapters=max_adapters, max_batch=max_batch, max_total_tokens=max_total_tokens,
                  max_concurrent_requests=max_concurrent_requests, local_root=Path(adapter_dir) if adapter_dir else None, share_bases=share_bases)


def serve(engine: "Engine", host: str = "127.0.0.1", port: int = 8080) -> None:
    import uvicorn

    from .api import create_app

    uvicorn.run(create_app(engine), host=host, port=port, log_level="warning")
