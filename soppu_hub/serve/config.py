"""What `soppu-hub serve` runs with: one dataclass whose fields carry their defaults and help (the CLI builds its
flags from it, build_engine and the Engine read it). Imports nothing heavy: `serve --help` needs no torch."""

from __future__ import annotations

from dataclasses import dataclass, field


def option(default, help: str, **flag):
    """A field with its flag's help (and "flag", "metavar", "type" where the CLI's defaults do not fit)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **flag})
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class ServeConfig:
    model: str = option("", "base model: Hub repo id or local folder")
    max_adapters: int = option(8, "adapters kept loaded (LRU)")
    max_lora_bytes: int | None = option(
        None,
        "bytes of LoRA weights kept loaded (LRU), e.g. 64MB: the bound GPU servers budget by (default: only "
        "--max-adapters)",
        flag="--max-lora-memory",
        metavar="SIZE",
    )
    collection: str | None = option(
        None,
        "a collection (folder written by compress --collection, or its repo id) whose members all stay resident: "
        "each cluster's bases once plus one core per member, addressed by repo id or name",
        metavar="SOURCE",
    )
    preload: list[str] = option(
        [],
        "adapters loaded at start, as LoRAX's --preloaded-adapter-ids (a folder under --adapter-dir, else a Hub "
        "repo id); one that does not load or fit the bounds stops the start in one line",
    )
    max_batch: int = option(16, "requests decoded together", flag="--max-batch-size")
    max_total_tokens: int | None = option(None, "prompt + new tokens per request (default: the model limit)", type=int)
    max_concurrent_requests: int = option(128, "requests in flight before 429")
    adapter_dir: str | None = option(None, "allow adapter_source=local for adapters under this folder only")
    share_bases: bool = option(
        True,
        "load soppu-compressed adapters as plain LoRA instead of through their shared basis",
        flag="--no-shared-bases",
    )
    admin_token: str | None = option(
        None,
        "routes that change what is served (POST /collection/reload) need 'Authorization: Bearer TOKEN'; without one "
        "they answer loopback clients only (default: $SOPPU_ADMIN_TOKEN)",
        metavar="TOKEN",
    )
    device: str = "cpu"
