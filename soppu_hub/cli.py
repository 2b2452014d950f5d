"""`soppu-hub` command line: parse arguments, call the library, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import SoppuError
from .peft_format.layout import BASE_MODEL_ID, DEFAULT_LORAX_TP
from .progress import ProgressBar, log_above_bars

if TYPE_CHECKING:
    from .pipeline.job import JobSpec

# The library (and torch with it) is imported where a command needs it, not here: card workers are spawned
# processes that import this module again, and should load only what drawing cards takes.


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that says where to look, not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _help(cls, name: str) -> str:
    """A config field's help, as its dataclass states it (one text for the library and the CLI)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = f.default if f.default is not dataclasses.MISSING else None
    return f"{f.metadata['help']} (default: {default})" if default not in (None, False, True) else f.metadata["help"]


def _add_fields(p: argparse.ArgumentParser, cls, names: list[str] | None = None) -> None:
    """One flag per field of a config dataclass: --field-name, its type, default, choices and help from the field."""
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names or "help" not in f.metadata:
            continue
        flag = f.metadata.get("flag", f"--{f.name.replace('_', '-')}")
        if isinstance(f.default, bool):
            p.add_argument(flag, dest=f.name, action="store_true", help=f.metadata["help"])
        else:
            kind = f.metadata.get("type", str if f.default is None else type(f.default))
            p.add_argument(flag, dest=f.name, type=kind, default=f.default,
                           choices=f.metadata.get("choices"), help=_help(cls, f.name))


def _command_line(argv: list[str]) -> str:
    """The command to reproduce a run, with any token value removed."""
    import shlex

    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--token":
            skip = True
            continue
        if a.startswith("--token="):
            continue
        kept.append(a)
    return "soppu-hub " + shlex.join(kept)


def _sources_from_file(path: str | None) -> list[str]:
    """One source a line; blank lines and # comments skipped."""
    if not path:
        return []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SoppuError(f"cannot read --sources-file {path} ({type(e).__name__}: {e.strerror if isinstance(e, OSError) else e}); "
                         "give a text file with one adapter folder or repo id a line") from None
    sources = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not sources:
        raise SoppuError(f"--sources-file {path} names no adapters; give one adapter folder or repo id a line")
    return sources


def _add_export_args(p: argparse.ArgumentParser) -> None:
    from .compression.export import ExportConfig

    p.add_argument("--no-pad", dest="pad", action="store_false", help=ExportConfig.__dataclass_fields__["pad"].metadata["help"])
    p.add_argument("--lorax-tp", type=int, default=DEFAULT_LORAX_TP, metavar="N", help=_help(ExportConfig, "lorax_tp"))
    _add_fields(p, ExportConfig, ["dtype"])


def _ranks(text: str | None, verify: bool) -> list[int]:
    """--verify-ranks 8,16,24 -> [8, 16, 24]."""
    if not text:
        return []
    if not verify:
        raise SoppuError("--verify-ranks needs --verify (it checks the same fit at smaller ranks)")
    try:
        ranks = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise SoppuError(f"--verify-ranks takes comma-separated positive integers (e.g. 8,16,24), got {text!r}") from None
    if not ranks or min(ranks) < 1:
        raise SoppuError(f"--verify-ranks takes comma-separated positive integers (e.g. 8,16,24), got {text!r}")
    return ranks


def job_spec(args: argparse.Namespace) -> "JobSpec":
    """The run the flags describe (sources from the command line and --sources-file; --author is listed later)."""
    from .compression.export import ExportConfig
    from .compression.plan import CompressConfig
    from .pipeline.job import JobSpec

    config = CompressConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CompressConfig)})
    export = ExportConfig(pad=args.pad, lorax_tp=args.lorax_tp, dtype=args.dtype)
    simple = {f.name: getattr(args, f.name) for f in dataclasses.fields(JobSpec)
              if f.name not in ("sources", "config", "export", "out", "push", "verify_ranks", "command")}
    return JobSpec(sources=[*args.sources, *_sources_from_file(args.sources_file)], config=config, export=export,
                   out=Path(args.out) if args.out else None, push=not args.no_push,
                   verify_ranks=_ranks(args.verify_ranks, args.verify), command=_command_line(args.argv), **simple)


def cmd_compress(args: argparse.Namespace) -> int:
    from .compression.report import format_table
    from .pipeline.job import run_job

    spec = job_spec(args)
    if args.author:
        from .hub.pull import list_adapter_repos

        spec.sources += list_adapter_repos(args.author, base_model=args.base_model, token=args.token, workers=args.workers)
    if not spec.sources:
        raise SoppuError("no adapters given: name folders or repo ids, or pass --sources-file FILE or --author USER")
    bars = {phase: ProgressBar(phase, unit) for phase, unit in
            (("downloading", "repo"), ("compressing", "module"), ("verifying", "adapter"), ("cards", "card"),
             ("pushing", "repo"))}
    log = (lambda msg: None) if args.quiet else log_above_bars
    shown = {k: None if args.quiet else b for k, b in bars.items()}
    try:
        result = run_job(spec, progress=shown["compressing"], log=log, cards_progress=shown["cards"],
                         download_progress=shown["downloading"], push_progress=shown["pushing"],
                         verify_progress=shown["verifying"])
    finally:
        for b in bars.values():
            b.close()
    if not args.quiet:
        print(format_table(result.report))
        if result.out:
            print(f"results: {result.out} (cards: {result.out}/<name>/README.md)")
        for repo_id, url in result.pushed.items():
            print(f"unchanged {repo_id} (already on the Hub)" if url == "unchanged" else f"pushed {repo_id}: {url}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "samples":
        from .devtools.bench.samples import RANKS, run_samples_bench

        ranks = tuple(int(r) for r in args.ranks.split(",")) if args.ranks else RANKS
        print(run_samples_bench(ranks, plot=args.plot))
        return 0
    if args.what == "scale":
        from .devtools.bench.scale import run_scale_bench

        print(run_scale_bench(n_adapters=args.adapters or 20, rank=args.rank, clusters=args.clusters, device=args.device,
                              per_family=not args.no_per_family))
        return 0
    if args.what == "serve":
        from .devtools.bench.serve import run_serve_bench

        print(run_serve_bench(n_adapters=args.adapters or 16, new_tokens=args.new_tokens, as_json=args.json))
        return 0
    from .devtools.bench.kernel import run_kernel_bench

    print(run_kernel_bench(layers=args.layers, ref_layers=args.ref_layers, device=args.device, seed=args.seed))
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_demo(args: argparse.Namespace) -> int:
    import signal

    from .devtools.demo import run_demo

    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the demo's servers as Ctrl-C does
    run_demo(Path(args.workdir), log=print, serve=not args.no_serve)
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    from .devtools.samples.collection import BuildConfig, build_collection, load_collection

    if args.action == "real-base":
        from .devtools.realbase import REAL_BASE_ID, real_base

        print(f"{REAL_BASE_ID}: {real_base()}")
        return 0
    if args.action == "check":
        c = load_collection(args.out)
        print(f"{c.folder}: {len(c.adapters)} adapters for {c.manifest['base_model']}, every file matches manifest.json")
        return 0
    config = BuildConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BuildConfig)})
    bar = ProgressBar("training", "step")
    try:
        c = build_collection(args.out, config, progress=bar, log=lambda m: print(m, file=sys.stderr))
    finally:
        bar.close()
    print(f"sample collection: {c.folder} ({len(c.adapters)} adapters; check it with soppu-hub samples check)")
    return 0


def cmd_collection(args: argparse.Namespace) -> int:
    from .devtools.collection.build import COLLECTION, build_collection

    manifest = build_collection(args.out or COLLECTION, args.base, only=args.only or None,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"real collection: {len(manifest['adapters'])} adapters in {args.out or COLLECTION}")
    return 0


def cmd_hub(args: argparse.Namespace) -> int:
    from .hubserver import load_auth, serve

    auth = load_auth(args.user, args.org, args.users_file)
    print(f"offline Hub on http://{args.host}:{args.port} (data in {args.root}); use HF_ENDPOINT=http://{args.host}:{args.port}",
          flush=True)
    serve(args.root, auth, host=args.host, port=args.port, max_commit_bytes=int(args.max_commit_mb * 2**20))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import build_engine, serve

    engine = build_engine(args.model, max_adapters=args.max_adapters, max_batch=args.max_batch_size,
                          max_total_tokens=args.max_total_tokens, max_concurrent_requests=args.max_concurrent_requests,
                          adapter_dir=args.adapter_dir, share_bases=not args.no_shared_bases)
    print(f"serving {args.model} (LoRAX API) on http://{args.host}:{args.port}", flush=True)
    serve(engine, host=args.host, port=args.port)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .clients import GenerationSettings, connect

    client = connect(args.url, api=args.api, auth_token=args.auth_token or os.environ.get("LORAX_API_TOKEN"))
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    adapter = None if args.adapter in ("", "-", BASE_MODEL_ID) else args.adapter
    client.check()  # fail early, before the first prompt, if the backend is not there
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    print(f"chatting with {adapter or 'the base model'} on {client.model_id} at {args.url}; Ctrl-D or /exit ends",
          file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        print("bot> " if interactive else "", end="", flush=True)
        reply = []
        for piece in client.stream(history, adapter, adapter_source=args.adapter_source, api_token=args.api_token,
                                   system_prompt=args.system, settings=settings):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def build_parser() -> argparse.ArgumentParser:
    from .compression.plan import CompressConfig
    from .pipeline.job import JobSpec

    parser = _Parser(prog="soppu-hub", description=__doc__)
    parser.add_argument("--version", action="version", version=f"soppu-hub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress LoRA adapters jointly into PEFT adapters + a shared-basis bundle")
    p.add_argument("sources", nargs="*", help="PEFT LoRA adapter folders or Hub repo ids (owner/name[@revision])")
    p.add_argument("--sources-file", metavar="FILE", help="more sources, one a line (# comments allowed)")
    p.add_argument("--author", metavar="USER", help="every LoRA adapter repo of this user or organisation (with --base-model, "
                   "only those for that base model); soppu outputs are left out")
    p.add_argument("--out", help=_help(JobSpec, "out"))
    p.add_argument("--no-push", action="store_true", help=_help(JobSpec, "push"))
    _add_fields(p, JobSpec, ["overwrite", "push_to", "namespace", "private", "revision", "token", "verify", "base_model"])
    p.add_argument("--verify-ranks", metavar="R1,R2,..", help=_help(JobSpec, "verify_ranks"))
    _add_fields(p, JobSpec, ["eval_file", "probe_file"])
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    _add_fields(p, JobSpec, ["workers"])
    _add_fields(p, CompressConfig)
    _add_export_args(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("bench", help="kernel: this kernel vs the seeds' Algorithm 1; serve: backend tokens/s, 1 vs N adapters; "
                       "scale: the whole CLI on N adapters from 8 task families; samples: agreement vs shared rank on "
                       "the sample collection")
    p.add_argument("what", nargs="?", default="kernel", choices=["kernel", "serve", "scale", "samples"])
    p.add_argument("--ranks", help="samples: comma-separated shared ranks (default 4,8,12,16,24,32,48)")
    p.add_argument("--plot", help="samples: also save the agreement-vs-rank plot here (PNG)")
    p.add_argument("--adapters", type=int, default=None, help="serve: distinct adapters (default 16); scale: adapters in the "
                   "collection (default 20)")
    p.add_argument("--rank", type=int, default=24, help="scale: shared rank (default 24)")
    p.add_argument("--clusters", default="auto", help="scale: --clusters for the run (default auto)")
    p.add_argument("--no-per-family", action="store_true", help="scale: skip compressing each family alone for comparison")
    p.add_argument("--new-tokens", type=int, default=32, help="serve: new tokens per request (default 32)")
    p.add_argument("--json", action="store_true", help="serve: one JSON object with every case instead of the table")
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

    from .devtools.samples.collection import COLLECTION, BuildConfig

    p = sub.add_parser("samples", help="build (train on the CPU, minutes) or check the sample collection the demo uses; "
                       "real-base: the real demo base model's folder (converted from its GGUF once)")
    p.add_argument("action", choices=["build", "check", "real-base"])
    p.add_argument("--out", default=str(COLLECTION), help="collection folder (default: the one in the package)")
    for f in dataclasses.fields(BuildConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default, help=f"{f.metadata['help']} (default: {f.default})")
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser("collection", help="train the real collection on the real base (resumable, adapter by adapter)")
    p.add_argument("action", choices=["build"])
    p.add_argument("--out", help="collection folder (default: the one in the package)")
    p.add_argument("--base", help="base model folder (default: the real base, converted from its GGUF once)")
    p.add_argument("--only", action="append", metavar="TASK", help="train (again) only this task (repeatable)")
    p.set_defaults(func=cmd_collection)

    p = sub.add_parser("demo", help="the whole chain offline: Hub, sample adapters, compress by repo id, backend, the Space")
    p.add_argument("--workdir", default="demo-out", help="folder for the demo's files (default demo-out)")
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
