"""The embedded LoRAX-compatible CPU backend (`soppu-hub serve`). The compression path never imports it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import ServeConfig

if TYPE_CHECKING:  # importing the package must not pull the engine in: adapters.py and params.py stand alone
    from .engine import Engine


def build_engine(config: ServeConfig, *, token: str | None = None) -> Engine:
    """The engine, with `collection`'s members all resident and the `preload` adapters loaded; what cannot be
    served as asked (a bound too small, a damaged collection, an adapter that does not load) is one line at start."""
    from ..errors import CollectionError, ConfigError, SoppuError
    from ..hub.pull import model_folder
    from .engine import Engine
    from .errors import ServeError

    engine = Engine(model_folder(config.model, token=token), config)
    try:
        engine.adapters.check_budget()
        if config.preload:
            engine.adapters.preload_adapters(config.preload, token=token)
    except ServeError as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    if config.collection:
        try:
            engine.adapters.preload_collection(config.collection, token=token)
        except (SoppuError, ServeError, ValueError, OSError) as e:
            raise CollectionError(f"--collection {config.collection}: {str(e).splitlines()[0]}") from None
    return engine


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8080) -> None:
    import uvicorn

    from .api import create_app

    uvicorn.run(create_app(engine), host=host, port=port, log_level="warning")
