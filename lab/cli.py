"""`python -m lab`: the lab's commands (benches, the demo, the sample and real collections), thin over lab/ and
soppu_hub.

The lab is not installed with soppu-hub: these run from a source checkout (`make demo`, `make bench`). Errors are
one line, as soppu-hub's own (soppu_hub.cli.run).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from soppu_hub.cli import run
from soppu_hub.cli.flags import Parser
from soppu_hub.compression.quantize import STORE_DTYPES
from soppu_hub.errors import ConfigError
from soppu_hub.progress import ProgressBar

# bench's options: (flag, argparse keywords); each help names the benches that read it
BENCH_OPTIONS = [
    ("--joins", dict(type=int, default=100, help="join: adapters that join the collection one by one (default 100)")),
    (
        "--ranks",
        dict(
            help="samples: comma-separated shared ranks (default 4,8,12,16,24,32,48); quality: "
            "JD's shared ranks (default 16,32,48)"
        ),
    ),
    ("--svd-ranks", dict(help="quality: per-adapter SVD ranks, comma-separated (default 1,2,4)")),
    ("--plot", dict(help="samples, quality, peers, serve (curve): also save the plot here (PNG)")),
    (
        "--adapters",
        dict(
            default=None,
            help="serve: distinct adapters (default 16), or comma-separated counts for the "
            "throughput curve under a Poisson stream (e.g. 1,16,64,256,1000); scale: adapters in the "
            "collection (default 20); peers: adapters per family set (default 32); join: the collection (default 900); "
            "soak: resident members (default 1000)",
        ),
    ),
    ("--requests", dict(type=int, default=None, help="serve: requests per case of the throughput curve (default 200)")),
    (
        "--rate",
        dict(
            type=float,
            default=None,
            help="serve: Poisson arrival rate of the curve's requests per second, above what the backend serves, so "
            "tokens/s is its capacity (default 200); soak: requests per second, below it (default 8)",
        ),
    ),
    ("--minutes", dict(type=float, default=10.0, help="soak: minutes of traffic (default 10)")),
    ("--zipf", dict(type=float, default=None, help="serve: Zipf exponent of adapter popularity (default: uniform)")),
    (
        "--repeats",
        dict(type=int, default=1, help="serve: measured passes per case of the curve, the median reported (default 1)"),
    ),
    (
        "--store-dtype",
        dict(
            default="auto",
            choices=STORE_DTYPES,
            help="serve (curve), join: how the collection "
            "is kept (compress --store-dtype; a quantized one stays its codes in the server's memory; default auto)",
        ),
    ),
    (
        "--model",
        dict(
            choices=["tiny", "real"],
            default="tiny",
            help="serve (curve): the tiny Llama with synthetic "
            "adapters, or the real base (SmolLM2-135M-Instruct) with the real collection (default tiny)",
        ),
    ),
    ("--rank", dict(type=int, default=24, help="scale, join: shared rank (default 24)")),
    (
        "--clusters",
        dict(
            default="auto",
            help='scale: --clusters for the run (default auto; "default": compress with no --rank or --clusters, '
            "its own default)",
        ),
    ),
    ("--no-per-family", dict(action="store_true", help="scale: skip compressing each family alone for comparison")),
    ("--new-tokens", dict(type=int, default=None, help="serve: new tokens per request (default 32; the curve 16)")),
    (
        "--json",
        dict(action="store_true", help="serve, quality, peers, join: JSON with every case instead of the table"),
    ),
    ("--layers", dict(type=int, default=16, help="layers of Llama-3.2-1B shapes for this kernel (default 16)")),
    (
        "--ref-layers",
        dict(type=int, default=2, help="layers the slow reference runs on; its time is scaled to --layers (default 2)"),
    ),
    ("--device", dict(default="auto", help="device for this kernel (default auto)")),
    ("--seed", dict(type=int, default=0)),
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "bench",
        help="kernel: this kernel vs the seeds' Algorithm 1; serve: backend tokens/s, 1 vs N adapters; "
        "scale: the whole CLI on N adapters from 8 task families; samples: agreement vs shared rank on "
        "the sample collection; quality: held-out task score kept vs stored parameters on the real "
        "collection (JD settings beside per-adapter SVD); peers: soppu-hub vs per-adapter SVD and lorashare at matched "
        "stored parameters; join: a collection of N adapters published, then more join one by one",
    )
    p.add_argument(
        "what",
        nargs="?",
        default="kernel",
        choices=["kernel", "serve", "scale", "samples", "quality", "peers", "join", "soak"],
    )
    for flag, options in BENCH_OPTIONS:
        p.add_argument(flag, **options)
    p.set_defaults(func=cmd_bench)

    from lab.samples.collection import COLLECTION, BuildConfig

    p = sub.add_parser(
        "samples",
        help="build (train on the CPU, minutes) or check the sample collection the demo uses; "
        "real-base: the real demo base model's folder (converted from its GGUF once)",
    )
    p.add_argument("action", choices=["build", "check", "real-base"])
    p.add_argument("--out", default=str(COLLECTION), help="collection folder (default: the one in the package)")
    for f in dataclasses.fields(BuildConfig):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=int,
            default=f.default,
            help=f"{f.metadata['help']} (default: {f.default})",
        )
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser(
        "collection",
        help="build: train the real collection on the real base (resumable, adapter by "
        "adapter); show: its adapters' held-out scores beside the base model's",
    )
    p.add_argument("action", choices=["build", "show"])
    p.add_argument("--out", help="collection folder (default: the one in the package)")
    p.add_argument("--base", help="base model folder (default: the real base, converted from its GGUF once)")
    p.add_argument("--only", action="append", metavar="TASK", help="train (again) only this task (repeatable)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for training and scoring (default 2)")
    p.add_argument(
        "--rescore",
        action="store_true",
        help="build: score the trained adapters again and redo their cards (no training)",
    )
    p.set_defaults(func=cmd_collection)

    p = sub.add_parser(
        "demo", help="the whole chain offline: Hub, a base and its adapters, compress by repo id, backend, the Space"
    )
    p.add_argument("--workdir", default="demo-out", help="folder for the demo's files (default demo-out)")
    p.add_argument(
        "--set",
        dest="set_name",
        choices=["real", "tiny"],
        default="real",
        help="real: SmolLM2-135M-Instruct and the real collection (needs the demo extra); tiny: the "
        "1M-parameter sample collection, in seconds (default real)",
    )
    p.add_argument(
        "--no-serve", action="store_true", help="stop everything once the Space answers instead of waiting for Ctrl-C"
    )
    p.add_argument(
        "--write-examples",
        action="store_true",
        help="ask the backend the example prompts docs/demo.md shows, write its table from the replies, and stop "
        "(no background checks)",
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


def _log(msg: str) -> None:
    """A bench's or a build's progress line, on stderr at once (its result goes to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def _count(args: argparse.Namespace, default: int) -> int:
    try:
        return int(args.adapters) if args.adapters else default
    except ValueError:
        raise ConfigError(f"--adapters {args.adapters!r}: give one number of adapters for bench {args.what}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "samples":
        from lab.bench.samples import RANKS, run_samples_bench

        ranks = tuple(int(r) for r in args.ranks.split(",")) if args.ranks else RANKS
        print(run_samples_bench(ranks, plot=args.plot))
        return 0
    if args.what == "quality":
        from lab.bench.quality import RANKS, SVD_RANKS, run_quality_bench

        ranks = tuple(int(r) for r in args.ranks.split(",")) if args.ranks else RANKS
        svd_ranks = tuple(int(r) for r in args.svd_ranks.split(",")) if args.svd_ranks else SVD_RANKS
        print(
            run_quality_bench(
                ranks=ranks,
                svd_ranks=svd_ranks,
                as_json=args.json,
                plot=args.plot,
                log=_log,
            )
        )
        return 0
    if args.what == "soak":
        from lab.bench.soak import run_soak_bench

        members = int(args.adapters or 1000)
        print(run_soak_bench(as_json=args.json, minutes=args.minutes, members=members, rate=args.rate or 8.0, log=_log))
        return 0
    if args.what == "join":
        from lab.bench.join import run_join_bench

        print(
            run_join_bench(
                _count(args, 900),
                args.joins,
                rank=args.rank,
                clusters=args.clusters,
                as_json=args.json,
                store=args.store_dtype,
                log=_log,
            )
        )
        return 0
    if args.what == "peers":
        from lab.bench.peers import run_peers_bench

        print(run_peers_bench(_count(args, 32), as_json=args.json, plot=args.plot, log=_log))
        return 0
    if args.what == "scale":
        from lab.bench.scale import ADAPTERS, run_scale_bench

        print(
            run_scale_bench(
                n_adapters=_count(args, ADAPTERS),
                rank=args.rank,
                clusters=args.clusters,
                device=args.device,
                per_family=not args.no_per_family,
            )
        )
        return 0
    if args.what == "serve" and (args.requests or "," in (args.adapters or "") or args.model == "real"):
        from lab.bench.serve_load import run_load_bench

        try:
            counts = sorted({int(n) for n in args.adapters.split(",")}) if args.adapters else [1, 16, 64, 256, 1000]
        except ValueError:
            raise ConfigError(
                f"--adapters {args.adapters!r}: give comma-separated counts, e.g. 1,16,64,256,1000"
            ) from None
        print(
            run_load_bench(
                counts,
                args.requests or 200,
                as_json=args.json,
                plot=args.plot,
                rate=args.rate or 200.0,
                zipf=args.zipf,
                new_tokens=args.new_tokens or 16,
                seed=args.seed,
                real=args.model == "real",
                repeats=max(1, args.repeats),
                store=args.store_dtype,
                log=_log,
            )
        )
        return 0
    if args.what == "serve":
        from lab.bench.serve import run_serve_bench

        print(run_serve_bench(n_adapters=_count(args, 16), new_tokens=args.new_tokens or 32, as_json=args.json))
        return 0
    from lab.bench.kernel import run_kernel_bench

    print(run_kernel_bench(layers=args.layers, ref_layers=args.ref_layers, device=args.device, seed=args.seed))
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_demo(args: argparse.Namespace) -> int:
    import signal

    from lab.demo import run_demo

    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the demo's servers as Ctrl-C does
    # a shell's background job starts with SIGINT ignored, and Python then leaves it ignored: Ctrl-C (or kill -INT)
    # would do nothing. The demo always stops on it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.write_examples:
        from lab.demo_examples import DOC, ask, write_into

        def write(run) -> None:
            write_into(ask(run.backend_url))
            print(f"wrote the example replies into {DOC}")

        run_demo(Path(args.workdir), demo_set=args.set_name, serve=False, background_checks=False, on_ready=write)
        return 0
    run_demo(Path(args.workdir), demo_set=args.set_name, log=print, serve=not args.no_serve)
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    from lab.samples.collection import BuildConfig, build_collection, load_collection

    if args.action == "real-base":
        from lab.realbase import REAL_BASE_ID, real_base

        print(f"{REAL_BASE_ID}: {real_base()}")
        return 0
    if args.action == "check":
        c = load_collection(args.out)
        print(
            f"{c.folder}: {len(c.adapters)} adapters for {c.manifest['base_model']}, every file matches manifest.json"
        )
        return 0
    config = BuildConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BuildConfig)})
    bar = ProgressBar("training", "step")
    try:
        c = build_collection(args.out, config, progress=bar, log=_log)
    finally:
        bar.close()
    print(f"sample collection: {c.folder} ({len(c.adapters)} adapters; check it with python -m lab samples check)")
    return 0


def cmd_collection(args: argparse.Namespace) -> int:
    from lab.collection.build import COLLECTION, build_collection, format_collection, read_manifest

    if args.action == "show":
        print(format_collection(read_manifest(Path(args.out or COLLECTION))))
        return 0
    manifest = build_collection(
        args.out or COLLECTION, args.base, only=args.only or None, threads=args.threads, rescore=args.rescore, log=_log
    )
    print(f"real collection: {len(manifest['adapters'])} adapters in {args.out or COLLECTION}")
    return 0
