"""`soppu-hub bench samples`: how much of each trained sample adapter survives compression, rank by rank.

The sample collection's adapters are compressed together at several shared ranks; at each, the exports are
written as `soppu-hub compress` writes them and checked with `--verify`'s functional check (next-token
agreement with the original adapter on the fixed probe prompts). The table and the plot are how the demo's
rank was chosen: the smallest rank whose mean agreement clears the bar.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..samples.collection import COLLECTION, load_collection

RANKS = (4, 8, 12, 16, 24, 32, 48)
AGREEMENT_BAR = 0.85  # the demo's promise: mean next-token agreement at least this


@dataclass
class RankPoint:
    rank: int
    ratio: float  # parameters before / after
    mean_agreement: float
    min_agreement: float
    mean_reply_agreement: float
    mean_error: float


def sweep(folder: Path = COLLECTION, ranks: tuple[int, ...] = RANKS) -> list[RankPoint]:
    """Compress the collection at each rank, write the exports, and verify them against the originals."""
    from ..bundle import ExportConfig
    from ..compress import CompressConfig, compress
    from ..job import write_outputs
    from ..lora import read_adapter
    from ..verify import verify_adapters

    coll = load_collection(folder)
    names = [p.name for p in coll.adapters]
    points = []
    for rank in ranks:
        adapters = [read_adapter(p, name=p.name, stream=True) for p in coll.adapters]
        comp = compress(adapters, CompressConfig(rank=rank, device="cpu"))
        with tempfile.TemporaryDirectory() as tmp:
            report = write_outputs(comp, Path(tmp), names, names, ExportConfig())
            checks = verify_adapters(coll.base, coll.adapters, [Path(tmp) / n for n in names])
        agree = [c["next_token_agreement"] for c in checks]
        points.append(RankPoint(rank, report["compression_ratio"], statistics.fmean(agree), min(agree),
                                statistics.fmean(c["reply_agreement"] for c in checks),
                                statistics.fmean(a["mean_rel_error"] for a in report["adapters"])))
    return points


def chosen_rank(points: list[RankPoint], bar: float = AGREEMENT_BAR) -> RankPoint | None:
    """The smallest rank whose mean agreement clears the bar (None when none does)."""
    return next((p for p in sorted(points, key=lambda p: p.rank) if p.mean_agreement >= bar), None)


def plot_sweep(points: list[RankPoint], path: Path, bar: float = AGREEMENT_BAR) -> Path:
    """Agreement (mean and worst adapter) and compression ratio against the shared rank, one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [p.rank for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    ax.plot(ranks, [p.mean_agreement for p in points], "o-", label="mean agreement")
    ax.plot(ranks, [p.min_agreement for p in points], "s--", label="worst adapter")
    ax.plot(ranks, [p.mean_reply_agreement for p in points], "d-.", label="mean reply agreement")
    ax.axhline(bar, color="grey", lw=0.8, ls=":", label=f"bar {bar}")
    ax.set_xlabel("shared rank")
    ax.set_ylabel("next-token agreement")
    ax.set_ylim(0, 1.02)
    ax2 = ax.twinx()
    ax2.plot(ranks, [p.ratio for p in points], "^-", color="tab:green", label="fewer parameters (x)")
    ax2.set_ylabel("compression ratio (x)")
    lines = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=8)
    ax.set_title("sample collection: agreement with the originals vs shared rank", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_samples_bench(ranks: tuple[int, ...] = RANKS, plot: str | None = None) -> str:
    points = sweep(ranks=ranks)
    rows = ["| shared rank | fewer parameters | mean agreement | worst agreement | mean reply agreement | mean rel. error |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {p.rank} | {p.ratio:.2f}x | {p.mean_agreement:.3f} | {p.min_agreement:.3f} | {p.mean_reply_agreement:.3f} | "
             f"{p.mean_error:.4f} |" for p in points]
    best = chosen_rank(points)
    rows.append("")
    rows.append(f"smallest rank with mean agreement >= {AGREEMENT_BAR}: "
                + (f"{best.rank} ({best.ratio:.2f}x fewer parameters)" if best else "none of these"))
    if plot:
        rows.append(f"plot: {plot_sweep(points, Path(plot))}")
    return "\n".join(rows)
