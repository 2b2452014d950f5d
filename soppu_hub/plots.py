"""Card figures with matplotlib (Agg): error by layer per module type, and parameters before/after."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

_LAYER = re.compile(r"\.(\d+)\.")


def _layer_and_type(module: str) -> tuple[int, str]:
    m = _LAYER.search(module)
    return (int(m.group(1)) if m else -1), module.rsplit(".", 1)[-1]


def plot_errors_by_layer(report: dict, adapter_index: int, path: Path) -> Path:
    """Grouped bars: this adapter's relative error per layer and module type; dots: the others in the bundle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = report["adapters"][adapter_index]
    grid: dict[str, dict[int, float]] = defaultdict(dict)
    for module, v in own["modules"].items():
        layer, kind = _layer_and_type(module)
        grid[kind][layer] = v["rel_error"]
    others: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for j, a in enumerate(report["adapters"]):
        if j != adapter_index:
            for module, v in a["modules"].items():
                layer, kind = _layer_and_type(module)
                others[kind][layer].append(v["rel_error"])
    kinds = sorted(grid)
    layers = sorted({layer for g in grid.values() for layer in g})
    width = 0.8 / max(1, len(kinds))
    fig, ax = plt.subplots(figsize=(max(6.5, 0.5 * len(layers) * max(1, len(kinds)) ** 0.5 + 3), 4.6), dpi=110)
    cmap = plt.get_cmap("tab10")
    for k, kind in enumerate(kinds):
        xs = [i + (k - (len(kinds) - 1) / 2) * width for i in range(len(layers))]
        ax.bar(xs, [grid[kind].get(layer, 0.0) for layer in layers], width=width, color=cmap(k % 10), label=kind)
        for x, layer in zip(xs, layers):
            pts = others.get(kind, {}).get(layer, [])
            ax.scatter([x] * len(pts), pts, s=10, color="black", alpha=0.5, zorder=3,
                       label="other adapters in the bundle" if (k == 0 and x == xs[0] and pts) else None)
    ax.set_xticks(range(len(layers)), [str(layer) if layer >= 0 else "other" for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error  ||W - U S V^T|| / ||W||")
    top = max([v for g in grid.values() for v in g.values()] + [v for o in others.values() for vs in o.values() for v in vs] + [0.05])
    ax.set_ylim(0, 1.15 * top)
    ax.set_title(f"{own['name']}: reconstruction error by layer (JD-{report['method']}, rank {report['rank']})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(5, len(kinds) + 1), loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_params(report: dict, adapter_index: int, path: Path) -> Path:
    """Parameter counts: all adapters before vs the shared bundle after, and this adapter alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = report["adapters"][adapter_index]
    n = len(report["adapters"])
    labels = [f"{n} original LoRA(s)", "shared bundle\n(bases + all cores)", f"{own['name']}\noriginal"]
    values = [report["params_before"], report["params_after"], own["params_before"]]
    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=110)
    bars = ax.bar(labels, values, color=["#9aa5b1", "#2b8a3e", "#9aa5b1"])
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:,}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("parameters")
    ax.set_title(f"parameters: {report['params_before']:,} -> {report['params_after']:,} ({report['compression_ratio']:.2f}x)")
    ax.set_ylim(0, max(values) * 1.18)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
