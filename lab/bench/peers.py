"""`python -m lab bench peers`: soppu-hub against per-adapter SVD and lorashare (SHARE) at matched stored parameters.

The same adapter sets for every method: the scale bench's task families at two sizes (hidden 1024 and Llama-3.2-1B
shapes, q/v of 16 layers, rank 16, bf16 files), the sample collection, and the real collection when it is trained.
Each method runs in a child process (its wall time and peak RSS are its own) and writes one PEFT folder per
adapter; the bench reads every folder back and scores it against its original with one formula for all:
an adapter's relative error sqrt(sum over modules ||W - W'||^2 / sum ||W||^2). Stored parameters: soppu's bases,
cores and private directions (report.json, LoRA tensors only), SVD's per-adapter factors, lorashare's components
and loadings. soppu-hub runs its default, two whole-adapter errors and a --budget at every baseline row's store
with that row's worst error as the cap; the verdicts say, per baseline row, whether soppu-hub is "never behind"
(no more store, no more mean and no more worst error) and whether the default is within 5% of the best soppu-hub
error at its store.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from lab import ROOT
from lab.bench.peers_report import (
    DEFAULT,
    JD,
    SHARE,
    SOPPU,
    SVD,
    _label,
    format_peers,
    plot_peers,
)
from lab.bench.scale import LAYERS, LORA_RANK, bench_adapter, write_workload

SOPPU_RANKS = (16, 32, 64)
SVD_RANKS = (1, 2, 4, 8)
SHARE_KS = (16, 32, 64, 128)
ADAPTER_ERRORS = (0.1, 0.3)
PEERS_EXTRA = "pip install 'soppu-hub[peers]' (lorashare==0.1.3)"


def settings(n: int, ranks=SOPPU_RANKS, svd_ranks=SVD_RANKS, ks=SHARE_KS) -> list[tuple[str, dict]]:
    """(method, settings) for every fixed run: the baselines (per-adapter SVD, lorashare, JD with one cluster as in
    the paper), soppu-hub's default and two whole-adapter errors. budget_settings follow from their rows."""
    out = [(SVD, {"rank": r, "clusters": str(n)}) for r in svd_ranks]
    out += [(SHARE, {"k": k}) for k in ks]
    out += [(JD, {"rank": r, "clusters": "1"}) for r in ranks]
    out += [(SOPPU, dict(DEFAULT))]
    out += [(SOPPU, {"clusters": "auto", "adapter_error": e}) for e in ADAPTER_ERRORS]
    return out


def budget_settings(rows: list[dict]) -> list[tuple[str, dict]]:
    """soppu-hub with --budget at every baseline row's store (its worst error as the worst-adapter cap: never behind
    means no more store, mean error and worst error at once), and at the default's own store and worst error (the
    best mean soppu-hub reaches there without a worse worst adapter, which the default must come within
    DEFAULT_SLACK of)."""
    out = [
        (
            SOPPU,
            {
                "clusters": "auto",
                "rank": 32,
                "budget": str(r["stored_params"]),
                "max_adapter_error": round(r["worst_error"], 6),
            },
        )
        for r in rows
        if r["method"] in (SVD, SHARE)
    ]
    default = next((r for r in rows if r["method"] == SOPPU and r["setting"] == DEFAULT), None)
    if default is not None:
        out.append(
            (
                SOPPU,
                {
                    "clusters": "auto",
                    "rank": 32,
                    "budget": str(default["stored_params"]),
                    "max_adapter_error": round(default["worst_error"], 6),
                },
            )
        )
    return out


def family_set(root: Path, n: int, hidden: int) -> list[Path]:
    """n adapters of the scale bench's 8 families at hidden 1024 (q 1024 x 1024, v 256 x 1024) or 2048 (its own)."""
    if hidden == 2048:
        return write_workload(root, n)[0]

    from lab.samples import family_factors

    shapes = {
        f"model.layers.{i}.self_attn.{t}": s
        for i in range(LAYERS)
        for t, s in (("q_proj", (hidden, hidden)), ("v_proj", (hidden // 4, hidden)))
    }
    facs, _ = family_factors(shapes, n, LORA_RANK, families=8, family_dim=16, noise=0.05, seed=0)
    return [bench_adapter(root / f"lora-{i:04d}", f, "bench/hidden-1024") for i, f in enumerate(facs)]


def adapter_errors(originals: list[Path], written: Path) -> list[float]:
    """Each adapter's whole relative error against the PEFT folder written for it (written / <folder name>)."""
    from soppu_hub.compression.scoring import delta_sq_norms
    from soppu_hub.peft_format.read import read_adapter

    out = []
    for folder in originals:
        a, b = read_adapter(folder), read_adapter(written / folder.name)
        total = diff = 0.0
        for name, mod in a.modules.items():
            B, A = (t.double() for t in mod.factors())
            norm = float(delta_sq_norms(B, A))
            total += norm
            if name not in b.modules:
                diff += norm
                continue
            B2, A2 = (t.double() for t in b.modules[name].factors())
            cross = float(((B2.T @ B) * (A2 @ A.T)).sum())
            diff += max(norm - 2 * cross + float(delta_sq_norms(B2, A2)), 0.0)
        out.append(math.sqrt(diff / total) if total > 0 else 0.0)
    return out


def run_child(method: str, setting: dict, folders: list[Path], out: Path) -> dict:
    """One method in this process: write PEFT folders under `out`, return stored parameters and seconds."""
    import time

    start = time.perf_counter()
    if method == SHARE:
        from lorashare import SHAREModel

        share = SHAREModel.from_adapters({f.name: str(f) for f in folders}, num_components=setting["k"], device="cpu")
        for f in folders:
            share.reconstruct(f.name, output_dir=str(out / f.name))
        tensors = [*share.components.values(), *(t for loads in share.all_loadings.values() for t in loads.values())]
        stored = sum(t.numel() for t in tensors)
        stored_bytes = sum(t.numel() * t.element_size() for t in tensors)
    else:
        from soppu_hub.compression.config import CompressConfig
        from soppu_hub.pipeline.job import compress_folders

        config = CompressConfig(device="cpu", **setting)
        report = compress_folders(folders, out, config)
        stored = report.params_after - report.carried_params
        if config.budget is not None:
            stored = report.params_after  # a budget counts carried tensors too: the rows compare like with like
        stored_bytes = round(stored * report.store["bytes_per_number"])  # the store as kept (--store-dtype)
    return {"stored_params": stored, "stored_bytes": stored_bytes, "seconds": round(time.perf_counter() - start, 2)}


def _run(method: str, setting: dict, folders: list[Path], out: Path) -> dict:
    """run_child in a child process: its own wall time and peak RSS (ru_maxrss of that process alone)."""
    job = json.dumps({"method": method, "setting": setting, "folders": [str(f) for f in folders], "out": str(out)})
    res = subprocess.run([sys.executable, "-m", "lab.bench.peers", job], capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return {"failed": f"{method} {_label(setting)} failed: {tail}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def peer_rows(
    name: str, folders: list[Path], *, have_share: bool, log: Callable[[str], None] = lambda m: None, **budgets
) -> tuple[list[dict], list[str]]:
    """Every setting on one set: rows (method, setting, stored, ratio, mean / worst error, seconds, RSS) and the
    lines of settings that failed (lorashare refuses mixed ranks or targets)."""
    from soppu_hub.peft_format.read import read_adapter

    read = [read_adapter(f) for f in folders]
    before = sum(a.lora_params for a in read)
    before_bytes = sum(a.lora_params * a.dtype.itemsize for a in read)
    rows, failed = [], []

    def one(method: str, setting: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="soppu-peers-") as tmp:
            got = _run(method, setting, folders, Path(tmp) / "out")
            if "failed" in got:
                failed.append(f"{name}: {got['failed']}")
                log(failed[-1])
                return
            errors = adapter_errors(folders, Path(tmp) / "out")
        rows.append(
            {
                "set": name,
                "method": method,
                "setting": setting,
                "stored_params": got["stored_params"],
                "ratio": before / got["stored_params"],
                "stored_bytes": got["stored_bytes"],
                "ratio_bytes": before_bytes / got["stored_bytes"],
                "mean_error": statistics.fmean(errors),
                "worst_error": max(errors),
                "seconds": got["seconds"],
                "peak_rss_gb": got["peak_rss_gb"],
            }
        )
        log(
            f"{name}: {method} {_label(setting)}: {got['stored_params']:,} stored ({rows[-1]['ratio']:.2f}x), mean / "
            f"worst error {rows[-1]['mean_error']:.4f} / {rows[-1]['worst_error']:.4f}, {got['seconds']:.1f} s"
        )

    for method, setting in settings(len(folders), **budgets):
        if method != SHARE or have_share:
            one(method, setting)
    for method, setting in budget_settings(rows):
        one(method, setting)
    return rows, failed


def have_lorashare() -> bool:
    import importlib.util

    return importlib.util.find_spec("lorashare") is not None


def uniform_subset(folders: list[Path]) -> list[tuple[str, list[Path]]]:
    """The largest group of a mixed collection that lorashare accepts (one rank, one target list, no rsLoRA), as
    a set of its own when it is a proper subset of two or more: the peers then meet on real adapters too."""
    groups: dict[tuple, list[Path]] = {}
    for f in folders:
        c = json.loads((f / "adapter_config.json").read_text())
        groups.setdefault((c["r"], tuple(sorted(c["target_modules"])), bool(c.get("use_rslora"))), []).append(f)
    (r, targets, _), best = max(groups.items(), key=lambda kv: len(kv[1]))
    if len(best) < 2 or len(best) == len(folders):
        return []
    return [(f"real collection, its {len(best)} rank-{r} {'/'.join(t.split('_')[0] for t in targets)} adapters", best)]


def run_peers_bench(
    n_adapters: int = 32,
    *,
    as_json: bool = False,
    plot: str | None = None,
    log: Callable[[str], None] = lambda m: None,
    only: tuple[str, ...] | None = None,
) -> str:
    """Every set (or those whose names start with one of `only`), every method; lorashare missing or failing is
    one line and the rest still runs."""
    from lab.collection.build import COLLECTION, read_manifest
    from lab.samples.collection import COLLECTION as SAMPLES

    share = have_lorashare()
    notes = [] if share else [f"lorashare is not installed, so its rows are missing: {PEERS_EXTRA}"]
    rows, failed = [], []
    with tempfile.TemporaryDirectory(prefix="soppu-peers-sets-") as tmp:
        sets = [
            (f"families, hidden {h}, {n_adapters} adapters", family_set(Path(tmp) / f"h{h}", n_adapters, h))
            for h in (1024, 2048)
        ]
        sets.append(("sample collection", sorted(p for p in (SAMPLES / "adapters").iterdir() if p.is_dir())))
        real = sorted(read_manifest(COLLECTION).get("adapters", {})) if (COLLECTION / "manifest.json").is_file() else []
        if len(real) >= 2:
            sets.append((f"real collection ({len(real)})", [COLLECTION / "adapters" / n for n in real]))
            sets += uniform_subset([COLLECTION / "adapters" / n for n in real])
        for name, folders in sets if only is None else [s for s in sets if s[0].startswith(only)]:
            r, f = peer_rows(name, folders, have_share=share, log=log)
            rows += r
            failed += f
    if plot:
        plot_peers(rows, Path(plot))
        plot_peers(rows, Path(plot).with_name(f"{Path(plot).stem}-bytes{Path(plot).suffix}"), unit="bytes")
    if as_json:
        return json.dumps({"rows": rows, "failed": failed, "notes": notes}, indent=1)
    return "\n".join(notes + [format_peers(rows, failed)])


def peak_rss_kib() -> int:
    """This process's own peak RSS. Linux keeps ru_maxrss across execve, so a child started from a large parent
    reports at least the parent's; VmHWM belongs to the process's fresh address space and does not."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _child_main(job: str) -> None:
    spec = json.loads(job)
    got = run_child(spec["method"], spec["setting"], [Path(f) for f in spec["folders"]], Path(spec["out"]))
    got["peak_rss_gb"] = round(peak_rss_kib() / 2**20, 3)
    print(json.dumps(got))


if __name__ == "__main__":
    _child_main(sys.argv[1])
