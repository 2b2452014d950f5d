"""`soppu-hub` command line: parse arguments, call the library, print. Nothing else lives here.

The library (and torch with it) is imported where a command needs it, not at import: card workers are spawned
processes that import the main module again, and should load only what drawing cards takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .. import __version__
from ..errors import SoppuError
from ..peft_format.layout import BASE_MODEL_ID
from .commands import (
    cmd_bench,
    cmd_chat,
    cmd_collection,
    cmd_compress,
    cmd_demo,
    cmd_hub,
    cmd_join,
    cmd_samples,
    cmd_serve,
)
from .flags import Parser, add_export_args, add_fields, byte_size, command_line, field_help, job_spec

__all__ = ["build_parser", "command_line", "job_spec", "main"]


def build_parser() -> argparse.ArgumentParser:
    from ..compression.config import CompressConfig
    from ..compression.quantize import STORE_DTYPES
    from ..pipeline.job import JobSpec

    parser = Parser(prog="soppu-hub", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"soppu-hub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress LoRA adapters jointly into PEFT adapters + a shared-basis bundle")
    p.add_argument("sources", nargs="*", help="PEFT LoRA adapter folders or Hub repo ids (owner/name[@revision])")
    p.add_argument("--sources-file", metavar="FILE", help="more sources, one a line (# comments allowed)")
    p.add_argument("--author", metavar="USER", help="every LoRA adapter repo of this user or organisation (with --base-model, "
                   "only those for that base model); soppu outputs are left out")
    p.add_argument("--out", help=field_help(JobSpec, "out"))
    p.add_argument("--no-push", action="store_true", help=field_help(JobSpec, "push"))
    add_fields(p, JobSpec, ["overwrite", "push_to", "namespace", "private", "revision", "token", "verify", "base_model"])
    p.add_argument("--verify-ranks", metavar="R1,R2,..", help=field_help(JobSpec, "verify_ranks"))
    add_fields(p, JobSpec, ["eval_file", "probe_file"])
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    add_fields(p, JobSpec, ["workers", "collection", "refit", "own_bases"])
    add_fields(p, CompressConfig)
    add_export_args(p, store=True)
    p.set_defaults(func=cmd_compress)

    from ..collection.join import FLAGS as JOIN_FLAGS
    from ..collection.join import JoinSpec

    p = sub.add_parser("join", help="compress one adapter against a published collection's bases and add it to the "
                       "collection (downloads only one cluster's bases)")
    p.add_argument("source", help=field_help(JoinSpec, "source"))
    p.add_argument("--collection", required=True, help=field_help(JoinSpec, "collection"))
    p.add_argument("--out", help=field_help(JoinSpec, "out"))
    p.add_argument("--no-push", action="store_true", help="keep the member repo local (needs --out); a collection folder "
                   "is then updated in place")
    add_fields(p, JoinSpec, list(JOIN_FLAGS))
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    add_export_args(p)
    p.set_defaults(func=cmd_join)

    p = sub.add_parser("bench", help="kernel: this kernel vs the seeds' Algorithm 1; serve: backend tokens/s, 1 vs N adapters; "
                       "scale: the whole CLI on N adapters from 8 task families; samples: agreement vs shared rank on "
                       "the sample collection; quality: held-out task score kept vs stored parameters on the real "
                       "collection (JD settings beside per-adapter SVD); peers: soppu-hub vs per-adapter SVD and lorashare at matched "
                       "stored parameters; join: a collection of N adapters published, then more join one by one")
    p.add_argument("what", nargs="?", default="kernel", choices=["kernel", "serve", "scale", "samples", "quality", "peers",
                                                                 "join"])
    p.add_argument("--joins", type=int, default=100, help="join: adapters that join the collection one by one (default 100)")
    p.add_argument("--ranks", help="samples: comma-separated shared ranks (default 4,8,12,16,24,32,48); quality: "
                   "JD's shared ranks (default 16,32,48)")
    p.add_argument("--svd-ranks", help="quality: per-adapter SVD ranks, comma-separated (default 1,2,4)")
    p.add_argument("--plot", help="samples, quality, peers, serve (curve): also save the plot here (PNG)")
    p.add_argument("--adapters", default=None, help="serve: distinct adapters (default 16), or comma-separated counts for the "
                   "throughput curve under a Poisson stream (e.g. 1,16,64,256,1000); scale: adapters in the "
                   "collection (default 20); peers: adapters per family set (default 32); join: the collection (default 900)")
    p.add_argument("--requests", type=int, default=None, help="serve: requests per case of the throughput curve (default 200)")
    p.add_argument("--rate", type=float, default=200.0, help="serve: Poisson arrival rate of the curve's requests per second; "
                   "above what the backend serves, so tokens/s is its capacity (default 200)")
    p.add_argument("--zipf", type=float, default=None, help="serve: Zipf exponent of adapter popularity (default: uniform)")
    p.add_argument("--repeats", type=int, default=1, help="serve: measured passes per case of the curve, the median "
                   "reported (default 1)")
    p.add_argument("--store-dtype", default="auto", choices=STORE_DTYPES, help="serve (curve), join: how the collection "
                   "is kept (compress --store-dtype; a quantized one stays its codes in the server's memory; default auto)")
    p.add_argument("--model", choices=["tiny", "real"], default="tiny", help="serve (curve): the tiny Llama with synthetic "
                   "adapters, or the real base (SmolLM2-135M-Instruct) with the real collection (default tiny)")
    p.add_argument("--rank", type=int, default=24, help="scale, join: shared rank (default 24)")
    p.add_argument("--clusters", default="auto", help="scale: --clusters for the run (default auto; \"default\": compress with no --rank or --clusters, its own default)")
    p.add_argument("--no-per-family", action="store_true", help="scale: skip compressing each family alone for comparison")
    p.add_argument("--new-tokens", type=int, default=None, help="serve: new tokens per request (default 32; the curve 16)")
    p.add_argument("--json", action="store_true", help="serve, quality, peers, join: JSON with every case instead of the table")
    p.add_argument("--layers", type=int, default=16, help="layers of Llama-3.2-1B shapes for this kernel (default 16)")
    p.add_argument("--ref-layers", type=int, default=2,
                   help="layers the slow reference runs on; its time is scaled to --layers (default 2)")
    p.add_argument("--device", default="auto", help="device for this kernel (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("hub", help="run the offline Hub-compatible server (point HF_ENDPOINT at it)")
    p.add_argument("--root", default="hub-data", help="storage folder (default hub-data)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8900)
    p.add_argument("--user", action="append", default=[], metavar="NAME:TOKEN", help="a user and their token (repeatable)")
    p.add_argument("--org", action="append", default=[], metavar="ORG:MEMBER,...", help="an organisation (repeatable)")
    p.add_argument("--users-file", help='JSON {"users": {name: token}, "orgs": {org: [members]}} (or the same JSON in '
                   "$SOPPU_HUB_USERS, which keeps tokens off disk)")
    p.add_argument("--max-commit-mb", type=float, default=128, help="largest commit body accepted, in MiB (default 128)")
    p.set_defaults(func=cmd_hub)

    p = sub.add_parser("serve", help="CPU backend speaking LoRAX's REST API: adapters load by name on first use")
    p.add_argument("--model", required=True, help="base model: Hub repo id or local folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-adapters", type=int, default=8, help="adapters kept loaded (LRU) (default 8)")
    p.add_argument("--max-lora-memory", type=byte_size, default=None, metavar="SIZE",
                   help="bytes of LoRA weights kept loaded (LRU), e.g. 64MB: the bound GPU servers budget by "
                   "(default: only --max-adapters)")
    p.add_argument("--collection", default=None, metavar="SOURCE",
                   help="a collection (folder written by compress --collection, or its repo id) whose members all stay "
                   "resident: each cluster's bases once plus one core per member, addressed by repo id or name")
    p.add_argument("--preload", "--preloaded-adapter-ids", action="extend", nargs="+", default=[], metavar="ADAPTER",
                   help="adapters loaded at start, as LoRAX's --preloaded-adapter-ids (a folder under --adapter-dir, "
                   "else a Hub repo id); one that does not load or fit the bounds stops the start in one line")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-total-tokens", type=int, default=None, help="prompt + new tokens per request (default: model limit)")
    p.add_argument("--max-concurrent-requests", type=int, default=128, help="requests in flight before 429 (default 128)")
    p.add_argument("--adapter-dir", help="allow adapter_source=local for adapters under this folder only")
    p.add_argument("--no-shared-bases", action="store_true",
                   help="load soppu-compressed adapters as plain LoRA instead of through their shared basis")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="terminal chat with an adapter through a LoRAX-compatible backend (streamed)")
    p.add_argument("adapter", help=f"adapter repo id (or {BASE_MODEL_ID} for none)")
    p.add_argument("--url", default=os.environ.get("LORAX_URL", "http://127.0.0.1:8080"), help="backend URL (default $LORAX_URL)")
    p.add_argument("--api", default=os.environ.get("BACKEND_API", "lorax"), choices=["lorax", "openai"],
                   help="lorax: LoRAX's REST API; openai: /v1/chat/completions with the adapter id as model, as vLLM "
                   "serves LoRA adapters (default $BACKEND_API or lorax)")
    p.add_argument("--adapter-source", default="hub", choices=["hub", "local"])
    p.add_argument("--api-token", help="Hub token the backend uses for a private adapter")
    p.add_argument("--auth-token", help="bearer token of the backend itself (default $LORAX_API_TOKEN)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: greedy)")
    p.set_defaults(func=cmd_chat)

    from ..devtools.samples.collection import COLLECTION, BuildConfig

    p = sub.add_parser("samples", help="build (train on the CPU, minutes) or check the sample collection the demo uses; "
                       "real-base: the real demo base model's folder (converted from its GGUF once)")
    p.add_argument("action", choices=["build", "check", "real-base"])
    p.add_argument("--out", default=str(COLLECTION), help="collection folder (default: the one in the package)")
    for f in dataclasses.fields(BuildConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default, help=f"{f.metadata['help']} (default: {f.default})")
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser("collection", help="build: train the real collection on the real base (resumable, adapter by "
                       "adapter); show: its adapters' held-out scores beside the base model's")
    p.add_argument("action", choices=["build", "show"])
    p.add_argument("--out", help="collection folder (default: the one in the package)")
    p.add_argument("--base", help="base model folder (default: the real base, converted from its GGUF once)")
    p.add_argument("--only", action="append", metavar="TASK", help="train (again) only this task (repeatable)")
    p.set_defaults(func=cmd_collection)

    p = sub.add_parser("demo", help="the whole chain offline: Hub, a base and its adapters, compress by repo id, backend, "
                       "the Space")
    p.add_argument("--workdir", default="demo-out", help="folder for the demo's files (default demo-out)")
    p.add_argument("--set", dest="set_name", choices=["real", "tiny"], default="real",
                   help="real: SmolLM2-135M-Instruct and the real collection (needs the demo extra); tiny: the "
                        "1M-parameter sample collection, in seconds (default real)")
    p.add_argument("--no-serve", action="store_true", help="stop everything once the Space answers instead of waiting for Ctrl-C")
    p.set_defaults(func=cmd_demo)
    return parser



def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
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
