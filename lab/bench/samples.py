"""`python -m lab bench samples`: how much of each trained sample adapter survives compression, rank by rank.

The sample collection's adapters are compressed together at several shared ranks; at each, the exports are
written as `soppu-hub compress` writes them and checked with `--verify`'s functional check (next-token
agreement with the original adapter on the fixed probe prompts). The table and the plot are how the demo's
rank was chosen: the smallest rank whose mean agreement clears the bar.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from lab.samples.collection import COLLECTION, load_collection

RANKS = (4, 8, 12, 16, 24, 32, 48)
AGREEMENT_BAR = 0.85  # the demo's promise: mean next-token agreement at least this


def sweep(folder: Path = COLLECTION, ranks: tuple[int, ...] = RANKS) -> list[dict]:
    """Compress the collection at each rank (a fit per rank), write the exports, verify them against the originals."""
    from soppu_hub.compression.config import CompressConfig
    from soppu_hub.compression.export import ExportConfig
    from soppu_hub.compression.plan import compress
    from soppu_hub.evaluate.verify import verify_adapters
    from soppu_hub.peft_format.read import read_adapter
    from soppu_hub.pipeline.outputs import write_outputs

    coll = load_collection(folder)
    names = [p.name for p in coll.adapters]
    rows = []
    for rank in ranks:
        adapters = [read_adapter(p, name=p.name, stream=True) for p in coll.adapters]
        comp = compress(adapters, CompressConfig(rank=rank, device="cpu"))
        with tempfile.TemporaryDirectory() as tmp:
            report = write_outputs(comp, Path(tmp), names, names, ExportConfig())
            checks = verify_adapters(coll.base, coll.adapters, [Path(tmp) / n for n in names])
        agree = [c["next_token_agreement"] for c in checks]
        rows.append(
            {
                "rank": rank,
                "compression_ratio": report.compression_ratio,
                "mean_next_token_agreement": statistics.fmean(agree),
                "min_next_token_agreement": min(agree),
                "mean_reply_agreement": statistics.fmean(c["reply_agreement"] for c in checks),
                "mean_rel_error": statistics.fmean(a.mean_rel_error for a in report.adapters),
            }
        )
    return rows


def chosen_rank(rows: list[dict], key: str = "mean_reply_agreement", bar: float = AGREEMENT_BAR) -> dict | None:
    """The smallest rank whose `key` clears the bar (None when none does)."""
    return next((r for r in sorted(rows, key=lambda r: r["rank"]) if r[key] >= bar), None)


def run_samples_bench(ranks: tuple[int, ...] = RANKS, plot: str | None = None) -> str:
    rows = sweep(ranks=ranks)
    out = [
        "| shared rank | fewer parameters | mean agreement | worst agreement | mean reply agreement | mean rel. error "
        "|",
        "|---|---|---|---|---|---|",
    ]
    out += [
        f"| {r['rank']} | {r['compression_ratio']:.2f}x | {r['mean_next_token_agreement']:.3f} | "
        f"{r['min_next_token_agreement']:.3f} | {r['mean_reply_agreement']:.3f} | {r['mean_rel_error']:.4f} |"
        for r in rows
    ]
    out.append("")
    for key, what in (
        ("mean_next_token_agreement", "mean next-token agreement"),
        ("mean_reply_agreement", "mean reply agreement"),
    ):
        best = chosen_rank(rows, key)
        out.append(
            f"smallest rank with {what} >= {AGREEMENT_BAR}: "
            + (f"{best['rank']} ({best['compression_ratio']:.2f}x fewer parameters)" if best else "none of these")
        )
    if plot:
        from soppu_hub.cards.plots import plot_rank_sweep

        out.append(f"plot: {plot_rank_sweep(rows, Path(plot), title='sample collection: a fit per shared rank')}")
    return "\n".join(out)
