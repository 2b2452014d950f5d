"""What one `soppu-hub compress` run is asked to do (`JobSpec`): sources, compression and export settings, where the
results go; the CLI builds its flags from the fields' help."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..compression.config import CompressConfig
from ..compression.export import ExportConfig
from ..hub.common import TOKEN_HELP


@dataclass
class JobSpec:
    """Everything one `soppu-hub compress` run needs. Field metadata is the CLI's help (cli/ reads it)."""

    sources: list[str] = field(metadata={"help": "PEFT adapter folders or Hub repo ids (owner/name[@revision])"})
    config: CompressConfig = field(default_factory=CompressConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    out: Path | None = field(
        default=None, metadata={"help": "keep results in this folder (must not exist or be empty unless --overwrite)"}
    )
    push: bool = field(
        default=True,
        metadata={"help": "push one repo per input to the Hub (--no-push keeps the results local, and needs --out)"},
    )
    push_to: str | None = field(
        default=None, metadata={"help": "target repo id for a single input (default <user>/<name>-soppu)"}
    )
    namespace: str | None = field(default=None, metadata={"help": "user or organisation for the target repos"})
    private: bool = field(default=False, metadata={"help": "create the target repos private"})
    revision: str | None = field(default=None, metadata={"help": "revision for Hub sources given without @revision"})
    token: str | bool | None = field(default=None, repr=False, metadata={"help": TOKEN_HELP})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})
    verify: bool = field(
        default=False, metadata={"help": "functional check: next-token agreement and KL with the base model"}
    )
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "base model for --verify (default: from the adapter config); with --author, only adapters for "
            "this base "
            "model"
        },
    )
    verify_ranks: list[int] = field(
        default_factory=list,
        metadata={
            "help": "with --verify, also check the same fit cut to these smaller shared ranks (comma-separated); the "
            "card "
            "plots agreement against rank"
        },
    )
    eval_file: str | None = field(
        default=None,
        metadata={
            "help": 'score base, original and compressed adapter on your own examples: a JSONL file of {"prompt", '
            '"answer"} lines, or a folder with <adapter name>.jsonl per adapter (exact match and chrF; the card also '
            "shows both adapters' replies to the first 4 examples)"
        },
    )
    card_note: str | None = field(
        default=None,
        metadata={
            "help": "a line shown at the top of every card, e.g. that checks are still running and the card will be "
            "replaced (one line of plain text)"
        },
    )
    probe_file: str | None = field(
        default=None,
        metadata={
            "help": 'with --verify, these prompts (one a line, or JSONL with "prompt") instead of the built-in probes'
        },
    )
    collection: str | None = field(
        default=None,
        metadata={
            "help": "also publish the clusters' bases once as this collection repo (owner/name) that others can join "
            "(soppu-hub join); each adapter's repo then carries its cores and a reference, not the bases. Pushing "
            "several adapters does this by default, as <namespace>/soppu-bases-<id of the target repos>"
        },
    )
    own_bases: bool = field(
        default=False,
        metadata={
            "help": "push several adapters without the default collection: every repo carries its own copy of its "
            "cluster's bases in soppu/ (self-contained repos, the bases' bytes once per repo)"
        },
    )
    refit: bool = field(
        default=False,
        metadata={
            "help": "with --collection: compress every member of that collection again, together, from the sources its "
            "members list records (none skipped), and publish a new revision of it and of every member"
        },
    )
    repo_ids: list[str] = field(default_factory=list)  # one target repo per source (a refit keeps each member's repo)
    command: str = "soppu-hub compress"  # recorded in the cards: how to reproduce the run
    workers: int = field(default=8, metadata={"help": "parallel downloads, pushes and card-drawing processes"})
