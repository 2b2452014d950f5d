"""`bench serve` curve results as a person reads them: ratios against the reference beside each case, the table, the
plot of tokens/s against the number of distinct adapters."""

from __future__ import annotations

from pathlib import Path


def reference(m: dict) -> float:
    """The better of the reference's runs (first and last): ratios against it are the conservative ones."""
    return max(r["tokens_per_s"] for r in m["rows"] if r["method"].startswith("one plain"))


def ratio(row: dict, m: dict) -> float:
    """A case's tokens/s over the reference measured beside it (its interleaved passes), else the better one."""
    return row["tokens_per_s"] / row.get("ref_tokens_per_s", reference(m))


def format_load(m: dict) -> str:
    w = m["workload"]
    header = ("method", "adapters", "tokens/s", "ref beside", "x ref", "TTFT p50", "p50", "p99")
    rows = [
        (
            r["method"],
            str(r["adapters"]),
            f"{r['tokens_per_s']:.1f}",
            f"{r['ref_tokens_per_s']:.1f}" if "ref_tokens_per_s" in r else "-",
            f"{ratio(r, m):.2f}",
            f"{r['ttft_p50']:.2f} s",
            f"{r['latency_p50']:.2f} s",
            f"{r['latency_p99']:.2f} s",
        )
        for r in m["rows"]
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    by = {(r["method"][:5], r["adapters"]): r for r in m["rows"]}
    ratios = [
        f"{n}: JD {ratio(by[('JD co', n)], m):.2f}x ref, "
        f"{by[('JD co', n)]['tokens_per_s'] / by[('plain', n)]['tokens_per_s']:.2f}x plain"
        for n in sorted({r["adapters"] for r in m["rows"] if not r["method"].startswith("one plain")})
    ]
    return "\n".join(
        [
            f"embedded backend (CPU), {w['model']} hidden {w['hidden']}, {w['layers']} layers, LoRA "
            f"r={'/'.join(map(str, w['lora_ranks']))} on {'/'.join(t.removesuffix('_proj') for t in w['targets'])}, "
            f"JD rank "
            f"{w['jd_rank']}; {w['requests']} requests per case (median of {w.get('repeats', 1)} passes), Poisson at "
            f"{w['rate']}/s, "
            f"{'Zipf ' + str(w['zipf']) if w['zipf'] else 'uniform'} over the adapters, {w['new_tokens']} new tokens "
            f"each; "
            "x ref: against the reference's passes run just before each pass of the case (else the better of first "
            "and last)",
            f"JD: {m['jd']['members']} members resident in {m['jd']['resident_bytes'] / 1e6:.1f} MB, store "
            f"{m['jd'].get('store', 'auto')} (server up in "
            f"{m['jd']['start_s']:.1f} s); plain: --max-lora-memory {m['plain_bound_bytes']:,} bytes"
            + (
                " (raised from JD's to the largest adapter's LoRA bytes: one adapter alone needs more than JD's all)"
                if m["plain_bound_bytes"] > m["jd"]["resident_bytes"]
                else ""
            ),
            *("  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in [header, *rows]),
            "per number of adapters: " + "; ".join(ratios),
        ]
    )


def plot_load(m: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for prefix, label, style in (
        ("JD", "JD collection, all resident", "o-"),
        ("plain", "plain PEFT at JD's memory (or one adapter's)", "s--"),
    ):
        pts = sorted((r["adapters"], r["tokens_per_s"]) for r in m["rows"][1:] if r["method"].startswith(prefix))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.axhline(reference(m), color="grey", linestyle=":", label="one adapter (reference)")
    ax.set_xscale("log")
    ax.set_xlabel("distinct adapters in the request stream")
    ax.set_ylabel("tokens / s (CPU, 2 cores)")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("Throughput as the number of adapters grows")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
