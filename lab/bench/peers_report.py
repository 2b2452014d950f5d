"""`bench peers`' rows as a person reads them: "never behind" verdicts, the table, the frontier plot."""

from __future__ import annotations

from pathlib import Path

ROUND_OFF = 1 + 1e-6  # the same reconstruction reached by two code paths differs in the last bits, not more
DEFAULT_SLACK = 1.05  # issue 33: the default within 5% of the best error soppu-hub reaches at the default's store
SHARE = "lorashare (SHARE)"
SVD = "per-adapter SVD"
JD = "JD (paper: shared bases only)"
SOPPU = "soppu-hub"
DEFAULT = {"clusters": "default"}


def _label(setting: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in setting.items())


def verdicts(rows: list[dict]) -> list[str]:
    """Per baseline row (per-adapter SVD, lorashare) of each set: the soppu-hub row storing no more with no more mean
    and no more worst error, up to float round-off ("never behind"), or the closest one; per set, the default against
    the best soppu-hub
    error at the default's store."""
    out = []
    for base in (r for r in rows if r["method"] in (SVD, SHARE)):
        ours = [
            r
            for r in rows
            if r["set"] == base["set"] and r["method"] == SOPPU and r["stored_params"] <= base["stored_params"]
        ]
        head = (
            f"{base['set']}, {base['method']} {_label(base['setting'])} ({base['stored_params']:,}, mean "
            f"{base['mean_error']:.4f}, worst {base['worst_error']:.4f}): "
        )
        if not ours:
            out.append(head + "no soppu-hub setting stores this little: BEHIND")
            continue
        ahead = [
            r
            for r in ours
            if r["mean_error"] <= base["mean_error"] * ROUND_OFF and r["worst_error"] <= base["worst_error"] * ROUND_OFF
        ]
        best = min(ahead or ours, key=lambda r: (r["mean_error"], r["worst_error"]))
        out.append(
            head + f"soppu-hub ({_label(best['setting'])}) {best['stored_params']:,}, mean {best['mean_error']:.4f}, "
            f"worst {best['worst_error']:.4f}: {'never behind' if ahead else 'BEHIND'}"
        )
    for name in dict.fromkeys(r["set"] for r in rows):
        default = next((r for r in rows if r["set"] == name and r["method"] == SOPPU and r["setting"] == DEFAULT), None)
        if default is None:
            continue
        there = [
            r
            for r in rows
            if r["set"] == name
            and r["method"] == SOPPU
            and r["stored_params"] <= default["stored_params"]
            and r["worst_error"] <= default["worst_error"] + 1e-3
        ]
        best = min(r["mean_error"] for r in there)
        ok = default["mean_error"] <= DEFAULT_SLACK * best + 1e-12
        out.append(
            f"{name}, the default ({default['stored_params']:,}, {default['ratio']:.2f}x): mean error "
            f"{default['mean_error']:.4f} (worst {default['worst_error']:.4f}), the best soppu-hub mean at no "
            f"more store and no worse worst adapter {best:.4f}: {'within' if ok else 'NOT within'} "
            f"{DEFAULT_SLACK - 1:.0%}"
        )
    return out


def format_peers(rows: list[dict], failed: list[str]) -> str:
    out = [
        "| set | method | setting | stored parameters | fewer parameters | stored MB | fewer bytes | mean / worst "
        "rel. error "
        "| seconds | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['set']} | {r['method']} | {_label(r['setting'])} | {r['stored_params']:,} | {r['ratio']:.2f}x | "
            + (f"{r['stored_bytes'] / 1e6:.2f} | {r['ratio_bytes']:.2f}x | " if "stored_bytes" in r else "- | - | ")
            + f"{r['mean_error']:.4f} / {r['worst_error']:.4f} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} GB |"
        )
    return "\n".join(out + [""] + verdicts(rows) + failed)


def plot_peers(rows: list[dict], path: Path, *, unit: str = "params") -> Path:
    """Mean (top) and worst (bottom) relative error against stored parameters (unit="bytes": stored bytes, each
    store as kept), one column per set, one line per method: the frontier each method draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    sets = list(dict.fromkeys(r["set"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colour = {m: f"C{i}" for i, m in enumerate(methods)}  # one colour per method in every panel
    cols = len(sets)
    fig, axes = plt.subplots(2, cols, figsize=(4.2 * cols, 7.2), squeeze=False)
    for c, name in enumerate(sets):
        mine = [r for r in rows if r["set"] == name]
        for ax, key in ((axes[0, c], "mean_error"), (axes[1, c], "worst_error")):
            for method in dict.fromkeys(r["method"] for r in mine):
                pts = sorted((r[f"stored_{unit}"], r[key]) for r in mine if r["method"] == method)
                ax.plot(*zip(*pts), marker="o", ls="none", color=colour[method], alpha=0.5)
                ax.plot(*zip(*frontier(pts)), label=method, color=colour[method])
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(name, fontsize=9)
            ax.set_xlabel(f"stored {'parameters' if unit == 'params' else 'bytes'}")
            ax.set_ylabel(key.replace("_", " ").replace("error", "relative error"))
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colour[m], marker="o", label=m) for m in methods]
    axes.flat[0].legend(handles=handles, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (store, error) points no cheaper point beats: the best error a method reaches at each store."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not out or y < out[-1][1]:
            out.append((x, y))
    return out
