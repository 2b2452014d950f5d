"""`soppu-hub` command line: parse arguments, call the library, print. Nothing else lives here.

The library (and torch with it) is imported where a command needs it, not at import: `soppu-hub --help` and
`soppu-hub chat --help` answer without torch, and card workers (spawned processes that import the main module
again) load only what drawing cards takes.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import SoppuError
from ..peft_format.layout import BASE_MODEL_ID
from .commands import cmd_chat, cmd_compress, cmd_hub, cmd_join, cmd_serve
from .flags import Parser, add_export_args, add_fields, byte_size, command_line, field_help, job_spec

__all__ = ["build_parser", "command_line", "job_spec", "main", "run"]

DESCRIPTION = (
    "Compress LoRA adapters jointly (a shared basis + a small core each), push them to the Hub as standard "
    "PEFT LoRAs, serve and chat with them."
)


def _compress(p: argparse.ArgumentParser) -> None:
    from ..compression.config import CompressConfig
    from ..pipeline.job import JobSpec

    p.add_argument("sources", nargs="*", help="PEFT LoRA adapter folders or Hub repo ids (owner/name[@revision])")
    p.add_argument("--sources-file", metavar="FILE", help="more sources, one a line (# comments allowed)")
    p.add_argument(
        "--author",
        metavar="USER",
        help="every LoRA adapter repo of this user or organisation (with --base-model, "
        "only those for that base model); soppu outputs are left out",
    )
    p.add_argument("--out", help=field_help(JobSpec, "out"))
    p.add_argument("--no-push", action="store_true", help=field_help(JobSpec, "push"))
    add_fields(
        p, JobSpec, ["overwrite", "push_to", "namespace", "private", "revision", "token", "verify", "base_model"]
    )
    p.add_argument("--verify-ranks", metavar="R1,R2,..", help=field_help(JobSpec, "verify_ranks"))
    add_fields(p, JobSpec, ["eval_file", "probe_file", "card_note"])
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    add_fields(p, JobSpec, ["workers", "collection", "refit", "own_bases"])
    add_fields(p, CompressConfig)
    add_export_args(p, store=True)
    p.set_defaults(func=cmd_compress)


def _join(p: argparse.ArgumentParser) -> None:
    from ..collection.join import FLAGS as JOIN_FLAGS
    from ..collection.join import JoinSpec

    p.add_argument("source", help=field_help(JoinSpec, "source"))
    p.add_argument("--collection", required=True, help=field_help(JoinSpec, "collection"))
    p.add_argument("--out", help=field_help(JoinSpec, "out"))
    p.add_argument(
        "--no-push",
        action="store_true",
        help="keep the member repo local (needs --out); a collection folder is then updated in place",
    )
    add_fields(p, JoinSpec, list(JOIN_FLAGS))
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    add_export_args(p)
    p.set_defaults(func=cmd_join)


def _hub(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default="hub-data", help="storage folder (default hub-data)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8900)
    p.add_argument(
        "--user", action="append", default=[], metavar="NAME:TOKEN", help="a user and their token (repeatable)"
    )
    p.add_argument("--org", action="append", default=[], metavar="ORG:MEMBER,...", help="an organisation (repeatable)")
    p.add_argument(
        "--users-file",
        help='JSON {"users": {name: token}, "orgs": {org: [members]}} (or the same JSON in '
        "$SOPPU_HUB_USERS, which keeps tokens off disk)",
    )
    p.add_argument(
        "--max-commit-mb", type=float, default=128, help="largest commit body accepted, in MiB (default 128)"
    )
    p.set_defaults(func=cmd_hub)


def _serve(p: argparse.ArgumentParser) -> None:
    from ..serve.config import ServeConfig

    p.add_argument("--model", required=True, help=field_help(ServeConfig, "model"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--preload",
        "--preloaded-adapter-ids",
        action="extend",
        nargs="+",
        default=[],
        metavar="ADAPTER",
        help=field_help(ServeConfig, "preload"),
    )
    add_fields(
        p,
        ServeConfig,
        [
            "max_adapters",
            "collection",
            "max_batch",
            "max_total_tokens",
            "max_concurrent_requests",
            "adapter_dir",
            "share_bases",
            "admin_token",
        ],
    )
    p.add_argument(
        "--max-lora-memory",
        dest="max_lora_bytes",
        type=byte_size,
        default=None,
        metavar="SIZE",
        help=field_help(ServeConfig, "max_lora_bytes"),
    )
    p.set_defaults(func=cmd_serve)


def _chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help=f"adapter repo id (or {BASE_MODEL_ID} for none)")
    p.add_argument(
        "--url", default=os.environ.get("LORAX_URL", "http://127.0.0.1:8080"), help="backend URL (default $LORAX_URL)"
    )
    p.add_argument(
        "--api",
        default=os.environ.get("BACKEND_API", "lorax"),
        choices=["lorax", "openai"],
        help="lorax: LoRAX's REST API; openai: /v1/chat/completions with the adapter id as model, as vLLM "
        "serves LoRA adapters (default $BACKEND_API or lorax)",
    )
    p.add_argument("--adapter-source", default="hub", choices=["hub", "local"])
    p.add_argument("--api-token", help="Hub token the backend uses for a private adapter")
    p.add_argument("--auth-token", help="bearer token of the backend itself (default $LORAX_API_TOKEN)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: greedy)")
    p.set_defaults(func=cmd_chat)


COMMANDS = {  # name -> (help, the function adding its arguments: run only for the command given)
    "compress": ("compress LoRA adapters jointly into PEFT adapters + a shared-basis bundle", _compress),
    "join": (
        "compress one adapter against a published collection's bases and add it to the "
        "collection (downloads only one cluster's bases)",
        _join,
    ),
    "hub": ("run the offline Hub-compatible server (point HF_ENDPOINT at it)", _hub),
    "serve": ("CPU backend speaking LoRAX's REST API: adapters load by name on first use", _serve),
    "chat": ("terminal chat with an adapter through a LoRAX-compatible backend (streamed)", _chat),
}


def build_parser(commands: list[str] | None = None) -> argparse.ArgumentParser:
    """Every subcommand with its help; the arguments (and the library they describe, torch with it) only of
    `commands` (None: all). `soppu-hub --help` and `soppu-hub chat --help` so import no torch."""
    parser = Parser(prog="soppu-hub", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"soppu-hub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if commands is None or name in commands:
            add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)  # the subcommand, if one is named
    return run(build_parser([first] if first else []), argv)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse and run one command: a SoppuError is one line and exit 2, anything unforeseen one line and exit 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    _terminate_as_interrupt()
    try:
        return args.func(args)
    except SoppuError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything unforeseen still gets one line; SOPPU_DEBUG=1 shows the traceback
        if os.environ.get("SOPPU_DEBUG"):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"error: unexpected {type(e).__name__}: {first} (rerun with SOPPU_DEBUG=1 for details)", file=sys.stderr)
        return 1


def _terminate_as_interrupt() -> None:
    """`kill` (SIGTERM) ends a command as Ctrl-C does: its cleanup runs (a half-written output folder is removed)
    instead of the process vanishing mid-write. Only from the main thread, where Python handles signals."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():

        def interrupt(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)
