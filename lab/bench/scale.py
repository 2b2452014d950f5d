"""`python -m lab bench scale`: the whole CLI on a collection of adapters from known task families.

Workload (issue 11): rank-16 LoRAs on q_proj and v_proj of 16 layers at Llama-3.2-1B shapes (q 2048x2048,
v 512x2048), bf16 files, drawn from 8 families (each family a 16-dimensional column and row space per module,
each adapter a random mix of it plus 5% of its own). The CLI runs as a child process; its wall time and peak
RSS are measured from here. The clusters it finds are scored against the families (adjusted Rand index), and
its errors against compressing each family on its own at the same rank (in-process, same code).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lab.samples import family_factors, write_adapter
from soppu_hub.compression.cluster import adjusted_rand_index

LAYERS, FAMILIES, LORA_RANK = 16, 8, 16
SHAPES = {
    f"model.layers.{i}.self_attn.{t}": s
    for i in range(LAYERS)
    for t, s in (("q_proj", (2048, 2048)), ("v_proj", (512, 2048)))
}


ADAPTERS = 20  # adapters in the collection unless --adapters says otherwise


def bench_adapter(folder: Path, factors: dict, base_model: str) -> Path:
    """One bench adapter as users publish them: rank LORA_RANK, alpha = rank, bf16."""
    return write_adapter(folder, factors, base_model=base_model, rank=LORA_RANK, alpha=LORA_RANK, dtype=torch.bfloat16)


def write_workload(root: Path, n: int, *, families: int = FAMILIES, seed: int = 0) -> tuple[list[Path], list[int]]:
    """n bf16 adapter folders in `root` (written in batches so memory stays flat) and each one's family."""
    folders: list[Path] = []
    fams: list[int] = []
    batch = 50
    for lo in range(0, n, batch):
        count = min(batch, n - lo)
        facs, fam = family_factors(
            SHAPES, count, LORA_RANK, families=families, family_dim=16, noise=0.05, seed=seed, offset=lo
        )
        for j, f in enumerate(facs):
            folders.append(bench_adapter(root / f"lora-{lo + j:04d}", f, "meta-llama/Llama-3.2-1B"))
        fams += fam
    return folders, fams


def _per_family_error(folders: list[Path], fams: list[int], rank: int) -> float:
    """Mean relative error when each family is compressed on its own at the same rank."""
    from soppu_hub.compression.config import CompressConfig
    from soppu_hub.compression.plan import compress
    from soppu_hub.peft_format.read import read_adapter

    errs = []
    for f in sorted(set(fams)):
        members = [read_adapter(p, stream=True) for p, g in zip(folders, fams) if g == f]
        comp = compress(members, CompressConfig(rank=rank, device="cpu"))
        errs += [e for st in comp.stats.values() for e in st.rel_errors.values()]
    return statistics.fmean(errs)


def run_scale_bench(
    n_adapters: int = ADAPTERS, rank: int = 24, clusters: str = "auto", device: str = "auto", per_family: bool = True
) -> str:
    with tempfile.TemporaryDirectory(prefix="soppu-bench-scale-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        folders, fams = write_workload(tmp / "in", n_adapters)
        made = time.perf_counter() - t0
        sources = tmp / "sources.txt"
        sources.write_text("".join(f"{p}\n" for p in folders))
        out = tmp / "out"
        chosen = [] if clusters == "default" else ["--rank", str(rank), "--clusters", clusters]  # default: no flags
        cmd = [
            sys.executable,
            "-m",
            "soppu_hub",
            "compress",
            "--sources-file",
            str(sources),
            *chosen,
            "--device",
            device,
            "--no-push",
            "--out",
            str(out),
            "--quiet",
        ]
        start = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if res.returncode != 0:
            raise RuntimeError(f"the CLI failed: {res.stderr.strip()}")
        rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
        report = json.loads((out / "report.json").read_text())
        found = [a["cluster"] for a in report["adapters"]]
        means = [a["mean_rel_error"] for a in report["adapters"]]
        fam_err = _per_family_error(folders, fams, rank) if per_family else None
    rows = [
        ("adapters (families)", f"{n_adapters} ({len(set(fams))})"),
        ("command", f"compress {' '.join(chosen) or '(the defaults)'} --no-push (workload written in {made:.1f} s)"),
        ("wall time, whole CLI", f"{wall:.1f} s (kernel {report['seconds']:.1f} s on {report['device']})"),
        ("peak RSS", f"{rss_gb:.2f} GB"),
        (
            "clusters found (sizes)",
            f"{len(report['clusters'])} ({', '.join(str(c['size']) for c in report['clusters'])})",
        ),
        ("adjusted Rand index vs families", f"{adjusted_rand_index(found, fams):.3f}"),
        (
            "parameters before -> after",
            f"{report['params_before']:,} -> {report['params_after']:,} ({report['compression_ratio']:.2f}x)",
        ),
        (
            "mean / worst relative error",
            f"{statistics.fmean(means):.4f} / {max(a['max_rel_error'] for a in report['adapters']):.4f}",
        ),
    ]
    if fam_err is not None:
        rows.append(
            (
                "mean error, each family alone",
                f"{fam_err:.4f} (the run: {statistics.fmean(means) / fam_err:.2f}x of it)",
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
