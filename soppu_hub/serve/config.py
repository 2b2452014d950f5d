"""What `soppu-hub serve` runs with: one dataclass whose fields carry their defaults and help (the CLI builds its
flags from it, build_engine and the Engine read it). Imports nothing heavy: `serve --help` needs no torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServeConfig:
    model: str = field(default="", metadata={"help": "base model: Hub repo id or local folder"})
    max_adapters: int = field(default=8, metadata={"help": "adapters kept loaded (LRU)"})
    max_lora_bytes: int | None = field(
        default=None,
        metadata={
            "help": "bytes of LoRA weights kept loaded (LRU), e.g. 64MB: the bound GPU servers budget by (default: "
            "only "
            "--max-adapters)",
            "flag": "--max-lora-memory",
            "metavar": "SIZE",
        },
    )
    collection: str | None = field(
        default=None,
        metadata={
            "help": "a collection (folder written by compress --collection, or its repo id) whose members all stay "
            "resident: each cluster's bases once plus one core per member, addressed by repo id or name",
            "metavar": "SOURCE",
        },
    )
    preload: list[str] = field(
        default_factory=list,
        metadata={
            "help": "adapters loaded at start, as LoRAX's --preloaded-adapter-ids (a folder under --adapter-dir, "
            "else a Hub "
            "repo id); one that does not load or fit the bounds stops the start in one line"
        },
    )
    max_batch: int = field(default=16, metadata={"help": "requests decoded together", "flag": "--max-batch-size"})
    max_total_tokens: int | None = field(
        default=None, metadata={"help": "prompt + new tokens per request (default: the model's limit)", "type": int}
    )
    max_concurrent_requests: int = field(default=128, metadata={"help": "requests in flight before 429"})
    adapter_dir: str | None = field(
        default=None, metadata={"help": "allow adapter_source=local for adapters under this folder only"}
    )
    share_bases: bool = field(
        default=True,
        metadata={
            "help": "load soppu-compressed adapters as plain LoRA instead of through their shared basis",
            "flag": "--no-shared-bases",
        },
    )
    admin_token: str | None = field(
        default=None,
        metadata={
            "help": "routes that change what is served (POST /collection/reload) need 'Authorization: Bearer "
            "TOKEN'; without one they answer loopback clients only (default: $SOPPU_ADMIN_TOKEN)",
            "metavar": "TOKEN",
        },
    )
    device: str = "cpu"
