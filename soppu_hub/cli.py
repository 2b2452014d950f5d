"""`soppu-hub` command line: parse arguments, call the library, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from . import __version__
from .compress import CompressConfig
from .errors import SoppuError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """One flag per CompressConfig field, help taken from the field's metadata."""
    choices = {"method": ["full", "diag"], "weighting": ["norm", "none"]}
    for f in dataclasses.fields(CompressConfig):
        p.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
            choices=choices.get(f.name), help=f"{f.metadata['help']} (default: {f.default})",
        )


class _ProgressBar:
    """tqdm (through huggingface_hub, so HF_HUB_DISABLE_PROGRESS_BARS applies), opened on the first update."""

    def __init__(self, desc: str, unit: str) -> None:
        self.desc, self.unit, self.bar = desc, unit, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from huggingface_hub.utils import tqdm

            self.bar = tqdm(total=total, unit=self.unit, desc=self.desc, leave=False)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_compress(args: argparse.Namespace) -> int:
    from .job import compress_folders
    from .report import format_table

    config = CompressConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CompressConfig)})
    bar = _ProgressBar("compressing", "module")
    try:
        report = compress_folders(args.sources, args.out, config, overwrite=args.overwrite, progress=None if args.quiet else bar)
    finally:
        bar.close()
    if not args.quiet:
        print(format_table(report))
        print(f"report: {Path(args.out) / 'report.json'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.kernel import run_kernel_bench

    print(run_kernel_bench(layers=args.layers, ref_layers=args.ref_layers, device=args.device, seed=args.seed))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.workdir), log=print)
    return 0


def cmd_hub(args: argparse.Namespace) -> int:
    from .hubserver import load_auth, serve

    auth = load_auth(args.user, args.org, args.users_file)
    print(f"offline Hub on http://{args.host}:{args.port} (data in {args.root}); use HF_ENDPOINT=http://{args.host}:{args.port}",
          flush=True)
    serve(args.root, auth, host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soppu-hub", description=__doc__)
    parser.add_argument("--version", action="version", version=f"soppu-hub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress LoRA adapters jointly into PEFT adapters + a shared-basis bundle")
    p.add_argument("sources", nargs="+", help="PEFT LoRA adapter folders")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    _add_config_args(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("bench", help="time this kernel against the seeds' Algorithm 1, side by side")
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
    p.add_argument("--users-file", help='JSON {"users": {name: token}, "orgs": {org: [members]}}')
    p.set_defaults(func=cmd_hub)

    p = sub.add_parser("demo", help="build sample adapters offline, compress them, print the report")
    p.add_argument("--workdir", default="demo-out", help="folder for the demo's files (default demo-out)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SoppuError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
