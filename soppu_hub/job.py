"""The main job as one library call: read adapters, compress them jointly, write every output atomically."""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .bundle import export_peft, save_bundle
from .compress import CompressConfig, Compression, Progress, compress
from .errors import SoppuError
from .lora import LoraAdapter, read_adapter
from .report import Output, build_report

BUNDLE_DIR = "soppu"  # inside each adapter folder: keeps the bundle's .safetensors away from LoRAX's top level
REPORT_NAME = "report.json"


def unique_names(names: list[str]) -> list[str]:
    """Make output names distinct in input order: a, a-2, a-3."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


@contextmanager
def staged_output(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `out`; it becomes `out` only if the block finishes, so a failure leaves nothing."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SoppuError(f"output folder {out} already exists and is not empty; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_outputs(comp: Compression, folder: Path, names: list[str], outputs: list[str]) -> dict:
    """Bundle, one PEFT folder per adapter (with its slice of the bundle), and report.json."""
    save_bundle(comp.bundle, folder / "bundle")
    for i, name in enumerate(names):
        export_peft(comp.bundle, i, folder / name)
        save_bundle(comp.bundle.subset(i), folder / name / BUNDLE_DIR)
    report = build_report(comp, [Output(n, a.source, o) for n, a, o in zip(names, comp.adapters, outputs)])
    (folder / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return report


def compress_folders(
    sources: list[str | Path],
    out: str | Path,
    config: CompressConfig,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Compress local PEFT adapter folders jointly into `out`; returns the report dict."""
    adapters: list[LoraAdapter] = [read_adapter(Path(s)) for s in sources]
    names = unique_names([a.name for a in adapters])
    out = Path(out)
    with staged_output(out, overwrite=overwrite) as tmp:
        comp = compress(adapters, config, progress=progress)
        return write_outputs(comp, tmp, names, [str(out / n) for n in names])
