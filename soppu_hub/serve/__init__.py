"""The embedded LoRAX-compatible CPU backend (`soppu-hub serve`). The compression path never imports it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing the package must not pull the engine in: adapters.py and params.py stand alone
    from .engine import Engine


def build_engine(model: str, *, max_adapters: int = 8, max_batch: int = 16, max_total_tokens: int | None = None,
                 max_concurrent_requests: int = 128, adapter_dir: str | None = None, token: str | None = None,
                 share_bases: bool = True, max_lora_bytes: int | None = None, collection: str | None = None,
                 preload: list[str] | None = None) -> "Engine":
    """The engine, with `collection`'s members all resident and the `preload` adapters loaded; what cannot be
    served as asked (a bound too small, a damaged collection, an adapter that does not load) is one line at start."""
    from ..errors import CollectionError, ConfigError, SoppuError
    from ..hub.pull import model_folder
    from .engine import Engine
    from .errors import ServeError

    folder = model_folder(model, token=token)
    engine = Engine(folder, model, max_adapters=max_adapters, max_batch=max_batch, max_total_tokens=max_total_tokens,
                    max_concurrent_requests=max_concurrent_requests, local_root=Path(adapter_dir) if adapter_dir else None,
                    share_bases=share_bases, max_lora_bytes=max_lora_bytes)
    try:
        engine.adapters.check_budget()
        if preload:
            engine.adapters.preload_adapters(preload, token=token)
    except ServeError as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    if collection:
        try:
            engine.adapters.preload(collection, token=token)
        except (SoppuError, ServeError, ValueError, OSError) as e:
            raise CollectionError(f"--collection {collection}: {str(e).splitlines()[0]}") from None
    return engine


def serve(engine: "Engine", host: str = "127.0.0.1", port: int = 8080) -> None:
    import uvicorn

    from .api import create_app

    uvicorn.run(create_app(engine), host=host, port=port, log_level="warning")
