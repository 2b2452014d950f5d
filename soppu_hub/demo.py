"""`make demo`: the main job on embedded defaults (sample adapters of a tiny Llama built offline)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from .compress import CompressConfig
from .errors import SoppuError
from .job import compress_folders
from .report import format_table
from .samples import build_tiny_llama, write_sample_adapters


def run_demo(workdir: Path, *, log: Callable[[str], None] = print, rank: int = 8) -> dict:
    """Build the tiny base and two related sample adapters, compress them jointly, return the report."""
    workdir = Path(workdir)
    marker = workdir / ".soppu-demo"
    if workdir.exists() and any(workdir.iterdir()) and not marker.exists():
        raise SoppuError(f"{workdir} exists and was not made by the demo; pass another --workdir")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    marker.touch()
    base = build_tiny_llama(workdir / "tiny-llama")
    log(f"built tiny Llama base model in {base}")
    sources = write_sample_adapters(workdir / "adapters", base_model=str(base))
    log(f"built sample adapters: {', '.join(str(s) for s in sources)}")
    report = compress_folders(sources, workdir / "compressed", CompressConfig(rank=rank))
    log(format_table(report))
    log(f"compressed adapters and report.json in {workdir / 'compressed'}")
    return report
