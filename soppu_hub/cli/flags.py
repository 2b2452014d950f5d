"""Flags: argparse with one-line errors, flags built from the config dataclasses' fields, the run they describe."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SoppuError
from ..peft_format.layout import LORAX_AUTO

if TYPE_CHECKING:
    from ..pipeline.job import JobSpec


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that says where to look, not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def field_help(cls, name: str) -> str:
    """A config field's help, as its dataclass states it (one text for the library and the CLI)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = f.default if f.default is not dataclasses.MISSING else None
    return (
        f"{f.metadata['help']} (default: {default})"
        if default not in (None, False, True, "default", "")
        else f.metadata["help"]
    )


def add_fields(p: argparse.ArgumentParser, cls, names: list[str] | None = None) -> None:
    """One flag per field of a config dataclass: --field-name, its type, default, choices and help from the field."""
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names or "help" not in f.metadata:
            continue
        flag = f.metadata.get("flag", f"--{f.name.replace('_', '-')}")
        if isinstance(f.default, bool):  # a flag that turns the default around (--no-shared-bases: True -> False)
            p.add_argument(
                flag, dest=f.name, action="store_false" if f.default else "store_true", help=f.metadata["help"]
            )
        else:
            kind = f.metadata.get("type", str if f.default is None else type(f.default))
            p.add_argument(
                flag,
                dest=f.name,
                type=kind,
                default=f.default,
                metavar=f.metadata.get("metavar"),
                choices=f.metadata.get("choices"),
                help=field_help(cls, f.name),
            )


def command_line(argv: list[str]) -> str:
    """The command to reproduce a run, with any token value removed."""
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
        raise SoppuError(
            f"cannot read --sources-file {path} ({type(e).__name__}: {e.strerror if isinstance(e, OSError) else e}); "
            "give a text file with one adapter folder or repo id a line"
        ) from None
    sources = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not sources:
        raise SoppuError(f"--sources-file {path} names no adapters; give one adapter folder or repo id a line")
    return sources


def _tp(text: str) -> int | str:
    """--lorax-tp: auto or an integer (its range is ExportConfig.validate's to say)."""
    if text == LORAX_AUTO:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes auto or a tensor-parallel size (an integer), not {text!r}") from None


def add_export_args(p: argparse.ArgumentParser, *, store: bool = False) -> None:
    """--no-pad, --uniform-rank, --lorax-tp, --export-dtype; with `store` (compress) --store-dtype too (a joiner's
    store is its collection's)."""
    from ..compression.export import ExportConfig

    p.add_argument(
        "--no-pad", dest="pad", action="store_false", help=ExportConfig.__dataclass_fields__["pad"].metadata["help"]
    )
    p.add_argument(
        "--lorax-tp", type=_tp, default=LORAX_AUTO, metavar="auto|N", help=field_help(ExportConfig, "lorax_tp")
    )
    add_fields(p, ExportConfig, ["uniform", "dtype", *(["store"] if store else [])])


def _ranks(text: str | None, verify: bool) -> list[int]:
    """--verify-ranks 8,16,24 -> [8, 16, 24]."""
    if not text:
        return []
    if not verify:
        raise SoppuError("--verify-ranks needs --verify (it checks the same fit at smaller ranks)")
    try:
        ranks = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise SoppuError(
            f"--verify-ranks takes comma-separated positive integers (e.g. 8,16,24), got {text!r}"
        ) from None
    if not ranks or min(ranks) < 1:
        raise SoppuError(f"--verify-ranks takes comma-separated positive integers (e.g. 8,16,24), got {text!r}")
    return ranks


def job_spec(args: argparse.Namespace) -> JobSpec:
    """The run the flags describe (sources from the command line and --sources-file; --author is listed later)."""
    from ..compression.config import CompressConfig
    from ..compression.export import ExportConfig
    from ..pipeline.job import JobSpec

    config = CompressConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CompressConfig)})
    export = ExportConfig(
        pad=args.pad, uniform=args.uniform, lorax_tp=args.lorax_tp, dtype=args.dtype, store=args.store
    )
    simple = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(JobSpec)
        if f.name not in ("sources", "config", "export", "out", "push", "verify_ranks", "command", "repo_ids")
    }
    return JobSpec(
        sources=[*args.sources, *_sources_from_file(args.sources_file)],
        config=config,
        export=export,
        out=Path(args.out) if args.out else None,
        push=not args.no_push,
        verify_ranks=_ranks(args.verify_ranks, args.verify),
        command=command_line(args.argv),
        **simple,
    )


_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "KB": 10**3,
    "M": 10**6,
    "MB": 10**6,
    "G": 10**9,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def byte_size(text: str) -> int:
    """'64MB', '1.5GiB' or a plain number of bytes, for --max-lora-memory (argparse type)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive size: give bytes, or a number with KB, MB, GB, KiB, MiB or GiB"
        )
    return int(float(m.group(1)) * _UNITS[unit])
