"""`soppu-hub bench quality`: held-out task score kept against stored parameters, JD settings beside per-adapter SVD.

On a collection whose adapters each carry their held-out examples (`eval.jsonl`, as the real collection's do),
side by side in one run: JD with one cluster, JD with `--clusters auto`, JD with `--target-error`, and
per-adapter truncated SVD (every adapter its own cluster: JD of one adapter is its exact truncated SVD, what
kohya's `resize_lora` does). Per setting: stored parameters (bases + cores, carried tensors included),
ratio, mean and worst relative error, mean and worst retention of the original's held-out chrF, seconds.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

RANKS = (8, 16, 32)
TARGET_ERRORS = (0.3, 0.5)


def settings(n_adapters: int, ranks=RANKS, target_errors=TARGET_ERRORS) -> list[tuple[str, dict]]:
    """(method, CompressConfig fields) for every setting the bench runs."""
    out = [("JD, one cluster", {"rank": r}) for r in ranks]
    out += [("JD, clusters auto", {"rank": r, "clusters": "auto"}) for r in ranks]
    out += [("JD, target error", {"rank": max(ranks), "target_error": e}) for e in target_errors]
    out += [("per-adapter SVD", {"rank": r, "clusters": str(n_adapters)}) for r in ranks]
    return out


def quality_rows(base_folder: Path, folders: list[Path], sets: list[list], *, ranks=RANKS, target_errors=TARGET_ERRORS,
                 log: Callable[[str], None] = lambda m: None) -> list[dict]:
    """Every setting's row; the originals are scored once, every compressed export on its adapter's examples."""
    from ...compression.export import ExportConfig
    from ...compression.plan import CompressConfig, compress
    from ...compression.task_eval import Scorer, retention
    from ...peft_format.read import read_adapter
    from ...pipeline.job import write_outputs

    names = [f.name for f in folders]
    scorer = Scorer(base_folder)
    originals = [scorer(f, s) for f, s in zip(folders, sets)]
    rows = []
    for method, fields in settings(len(folders), ranks, target_errors):
        started = time.perf_counter()
        adapters = [read_adapter(f, name=n, stream=True) for f, n in zip(folders, names)]
        comp = compress(adapters, CompressConfig(device="cpu", **fields))
        with tempfile.TemporaryDirectory(prefix="soppu-quality-") as tmp:
            report = write_outputs(comp, Path(tmp), names, names, ExportConfig())
            seconds = time.perf_counter() - started
            scores = [scorer(Path(tmp) / n, s) for n, s in zip(names, sets)]
        kept = [k for k in (retention(c, o) for c, o in zip(scores, originals)) if k is not None]
        errors = [a["mean_rel_error"] for a in report["adapters"]]
        rows.append({"method": method, "setting": fields, "stored_params": report["params_after"],
                     "params_before": report["params_before"], "ratio": report["compression_ratio"],
                     "clusters": len(report["clusters"]), "mean_rel_error": statistics.fmean(errors),
                     "worst_rel_error": max(a["max_rel_error"] for a in report["adapters"]),
                     "mean_retention": statistics.fmean(kept) if kept else None, "worst_retention": min(kept, default=None),
                     "seconds": round(seconds, 2)})
        log(f"{method} {fields}: {rows[-1]['ratio']:.2f}x, retention {rows[-1]['mean_retention']}")
    return rows


def format_quality(rows: list[dict]) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    out = ["| method | setting | stored parameters | fewer parameters | mean / worst rel. error | mean / worst retention | seconds |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        setting = ", ".join(f"{k} {v}" for k, v in r["setting"].items())
        out.append(f"| {r['method']} | {setting} | {r['stored_params']:,} | {r['ratio']:.2f}x | "
                   f"{r['mean_rel_error']:.3f} / {r['worst_rel_error']:.3f} | "
                   f"{f(r['mean_retention'], '.3f')} / {f(r['worst_retention'], '.3f')} | {r['seconds']:.1f} |")
    return "\n".join(out)


def plot_quality(rows: list[dict], path: Path) -> Path:
    """Mean held-out retention against compression ratio, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["ratio"], r["mean_retention"]) for r in rows if r["method"] == method and r["mean_retention"] is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xlabel("fewer stored parameters than the originals (x)")
    ax.set_ylabel("mean held-out chrF retention")
    ax.set_title("Task score kept against compression")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_quality_bench(collection: Path | None = None, *, ranks=RANKS, as_json: bool = False, plot: str | None = None,
                      log: Callable[[str], None] = lambda m: None) -> str:
    """The bench on the real collection (built by `soppu-hub collection build`) and the real base."""
    from ...compression.task_eval import read_eval_file
    from ...errors import ConfigError
    from ..collection.build import COLLECTION, EVAL_FILE, read_manifest
    from ..realbase import real_base

    collection = Path(collection or COLLECTION)
    done = sorted(read_manifest(collection)["adapters"])
    if len(done) < 2:
        raise ConfigError(f"the collection in {collection} has {len(done)} trained adapters; build it first with "
                          "`soppu-hub collection build` (at least 2 are needed)")
    folders = [collection / "adapters" / n for n in done]
    rows = quality_rows(real_base(), folders, [read_eval_file(f / EVAL_FILE) for f in folders], ranks=ranks, log=log)
    if plot:
        plot_quality(rows, Path(plot))
    return json.dumps(rows, indent=1) if as_json else format_quality(rows)
