"""report.json (a fixed shape other tools read) and the same numbers as a text table."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .compress import Compression


@dataclass
class Output:
    """Where one input adapter's compressed result went (folder or Hub repo id)."""

    name: str
    source: str
    output: str


def build_report(comp: Compression, outputs: list[Output]) -> dict:
    """The report dict. rel_error = ||W_i - U S_i V^T||_F / ||W_i||_F, scaling included, not squared."""
    adapters = []
    for i, (adapter, out) in enumerate(zip(comp.adapters, outputs)):
        modules = {name: {"rel_error": st.rel_errors[i]} for name, st in comp.stats.items() if i in st.rel_errors}
        errs = [m["rel_error"] for m in modules.values()]
        adapters.append(
            {
                "name": out.name,
                "source": out.source,
                "output": out.output,
                "params_before": adapter.num_params,
                "mean_rel_error": statistics.fmean(errs),
                "max_rel_error": max(errs),
                "modules": modules,
            }
        )
    before, after = comp.params_before, comp.params_after
    return {
        "method": comp.config.method,
        "rank": comp.config.rank,
        "device": comp.device,
        "seconds": round(comp.seconds, 4),
        "params_before": before,
        "params_after": after,
        "compression_ratio": before / after,
        "adapters": adapters,
    }


def format_table(report: dict) -> str:
    """Fixed-width summary for the terminal."""
    rows = [("adapter", "params", "mean rel err", "max rel err", "output")]
    for a in report["adapters"]:
        rows.append((a["name"], f"{a['params_before']:,}", f"{a['mean_rel_error']:.4f}", f"{a['max_rel_error']:.4f}", a["output"]))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        f"JD-{report['method']} rank {report['rank']} on {report['device']} in {report['seconds']:.2f}s: "
        f"{report['params_before']:,} -> {report['params_after']:,} parameters "
        f"({report['compression_ratio']:.2f}x)"
    )
    return "\n".join(lines)
