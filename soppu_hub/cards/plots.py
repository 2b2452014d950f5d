"""Card figures with matplotlib (Agg): error by layer per module type, parameters before/after, ranks per layer.

A thousand cards cannot each build a figure (about half a second apiece): `ClusterFigures` builds the error
figure once per cluster (axes, legend, layout, the cluster's error range) and per adapter only changes the bar
heights and the title before saving; the parameter figure is the same for adapters of equal size in a cluster,
so it is rendered once and its bytes reused.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..compression.report import AdapterReport, Report

_LAYER = re.compile(r"\.(\d+)\.")


def _layer_and_type(module: str) -> tuple[int, str]:
    m = _LAYER.search(module)
    return (int(m.group(1)) if m else -1), module.rsplit(".", 1)[-1]


def _finish(fig, path):
    """Lay the figure out, draw it, save it as a small PNG (a file, or a buffer) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.canvas.draw()
    _save_png(fig.canvas, path)
    plt.close(fig)
    return path


def _save_png(canvas, out) -> None:
    """A drawn canvas as a 32-colour PNG: plots hold a few line colours and their anti-aliasing, and the palette
    makes each file about 3x smaller than RGBA (the real demo's errors plot of 7 module types: 43 kB at 256 colours,
    29 kB at 32, no visible change); a thousand repos carry three each."""
    from PIL import Image

    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    image.convert("RGB").quantize(colors=32).save(out, format="png", optimize=True)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MAX_WIDTH = 12.0  # inches, at 110 dpi
LINES_PAST = 8  # layers: up to this many, grouped bars per layer; past it, a line per module type


class ClusterFigures:
    """The card figures of the adapters of one cluster (indices `members` of report.adapters)."""

    def __init__(self, report: Report, members: list[int]) -> None:
        self.report, self.members = report, members
        self._params_png: dict[int, bytes] = {}
        grid: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for j in members:
            for module, v in report.adapters[j].modules.items():
                layer, kind = _layer_and_type(module)
                grid[kind][layer].append(v["rel_error"])
        self.kinds = sorted(grid)
        self.layers = sorted({layer for g in grid.values() for layer in g})
        plt = _pyplot()
        width = 0.8 / max(1, len(self.kinds))
        # wider with more layers and module types, up to MAX_WIDTH: a real model (30 layers x 7 types) would
        # otherwise be a 4,700-pixel strip that a card or the Space shrinks to nothing
        wide = 0.5 * len(self.layers) * max(1, len(self.kinds)) ** 0.5 + 3
        self.fig, ax = plt.subplots(figsize=(min(MAX_WIDTH, max(6.5, wide)), 4.6), dpi=110)
        cmap = plt.get_cmap("tab10")
        self.marks = {}  # module type -> its bars (few layers) or its line (many: 210 bars of a real model blur)
        self.ranges = []
        self.lines = len(self.layers) > LINES_PAST
        if self.lines and len(members) > 1:  # one band, the same for every card: drawn into the background
            every = [[v for g in grid.values() for v in g.get(layer, [])] for layer in self.layers]
            self.ranges.append(
                ax.fill_between(
                    range(len(self.layers)),
                    [min(vs, default=0.0) for vs in every],
                    [max(vs, default=0.0) for vs in every],
                    color="grey",
                    alpha=0.18,
                    lw=0,
                    label=f"range over the {len(members)} adapters sharing these bases (all module types)",
                )
            )
        for k, kind in enumerate(self.kinds):
            if self.lines:
                (self.marks[kind],) = ax.plot(
                    range(len(self.layers)),
                    [float("nan")] * len(self.layers),
                    "o-",
                    ms=3,
                    lw=1.4,
                    color=cmap(k % 10),
                    label=kind,
                )
                continue
            xs = [i + (k - (len(self.kinds) - 1) / 2) * width for i in range(len(self.layers))]
            self.marks[kind] = ax.bar(xs, [0.0] * len(xs), width=width, color=cmap(k % 10), label=kind)
            if len(members) > 1:  # the range over the cluster's adapters, drawn once
                lo = [min(grid[kind].get(layer, [0.0])) for layer in self.layers]
                hi = [max(grid[kind].get(layer, [0.0])) for layer in self.layers]
                self.ranges.append(
                    ax.vlines(
                        xs,
                        lo,
                        hi,
                        color="black",
                        alpha=0.55,
                        lw=1.2,
                        zorder=3,
                        label=f"range over the {len(members)} adapters sharing these bases" if k == 0 else None,
                    )
                )
        step = 1 if len(self.layers) <= 16 else 5  # every fifth layer named past 16: labels that do not collide
        ax.set_xticks(
            range(len(self.layers)),
            [
                (str(layer) if layer >= 0 else "other") if i % step == 0 or layer < 0 else ""
                for i, layer in enumerate(self.layers)
            ],
        )
        ax.set_xlabel("layer")
        ax.set_ylabel("relative error  ||W - U S V^T|| / ||W||")
        top = max([v for g in grid.values() for vs in g.values() for v in vs] + [0.05])
        ax.set_ylim(0, 1.15 * top)
        ax.grid(axis="y", alpha=0.3)
        self._legend(ax, self.kinds)  # every type, for the layout; each card draws its own adapter's
        ax.set_title(f"reconstruction error by layer (JD-{report.method}, rank {report.rank})")
        self.name = ax.text(
            0.01,
            0.97,
            " ",
            transform=ax.transAxes,
            ha="left",
            va="top",
            fontsize=11,
            fontweight="bold",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8},
        )
        self.fig.tight_layout()
        # Blitting: draw everything that is the same for every adapter once, then per adapter only the bars,
        # the range lines over them and the title (a full draw per card was most of a card's cost).
        self.ax = ax
        moving = list(self.marks.values()) if self.lines else [b for bars in self.marks.values() for b in bars]
        self._moving = moving + ([] if self.lines else self.ranges) + [self.name]
        for artist in self._moving + [ax.get_legend()]:
            artist.set_visible(False)
        self.fig.canvas.draw()
        self._background = self.fig.canvas.copy_from_bbox(self.fig.bbox)
        for artist in self._moving:
            artist.set_visible(True)

    def _legend(self, ax, kinds: list[str]):
        handles = [self.marks[k] for k in kinds] + self.ranges[:1]
        return ax.legend(
            handles=handles,
            fontsize=8,
            ncol=min(5, len(handles)),
            loc="upper center",
            bbox_to_anchor=(0.5, -0.15),
            frameon=False,
        )

    def errors(self, index: int, path: Path) -> Path:
        """This adapter's error per layer and module type, over the cluster's range."""
        own = self.report.adapters[index]
        values: dict[str, dict[int, float]] = defaultdict(dict)
        for module, v in own.modules.items():
            layer, kind = _layer_and_type(module)
            values[kind][layer] = v["rel_error"]
        for kind, mark in self.marks.items():
            if self.lines:
                mark.set_ydata([values[kind].get(layer, float("nan")) for layer in self.layers])
                continue
            for bar, layer in zip(mark, self.layers):
                bar.set_height(values[kind].get(layer, 0.0))
        self.name.set_text(own.name)
        canvas = self.fig.canvas
        canvas.restore_region(self._background)
        for artist in self._moving:
            self.ax.draw_artist(artist)
        # the legend names the module types this adapter has, not every type of its cluster
        self.ax.draw_artist(self._legend(self.ax, [k for k in self.kinds if values[k]]))
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_png(canvas, path)
        return path

    def params(self, index: int, path: Path) -> Path:
        """All adapters before vs everything stored after, and this adapter alone (rendered once per size)."""
        own = self.report.adapters[index]
        if own.params_before not in self._params_png:
            import io

            buf = io.BytesIO()
            _params_figure(self.report, own, buf)
            self._params_png[own.params_before] = buf.getvalue()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self._params_png[own.params_before])
        return path

    def close(self) -> None:
        _pyplot().close(self.fig)


def _params_figure(report: Report, own: AdapterReport, out) -> None:
    plt = _pyplot()
    n = len(report.adapters)
    labels = [f"{n} original LoRA(s)", "stored after\n(bases + all cores)", "this adapter\noriginal"]
    values = [report.params_before, report.params_after, own.params_before]
    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=110)
    bars = ax.bar(labels, values, color=["#9aa5b1", "#2b8a3e", "#9aa5b1"])
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:,}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("parameters")
    ax.set_title(f"parameters: {report.params_before:,} -> {report.params_after:,} ({report.compression_ratio:.2f}x)")
    ax.set_ylim(0, max(values) * 1.18)
    ax.grid(axis="y", alpha=0.3)
    _finish(fig, out)


def plot_ranks(cluster: dict, path: Path) -> Path:
    """The shared rank chosen per layer and module type (--target-error), for one cluster."""
    plt = _pyplot()
    grid: dict[str, dict[int, int]] = defaultdict(dict)
    for module, r in cluster["ranks"].items():
        layer, kind = _layer_and_type(module)
        grid[kind][layer] = r
    layers = sorted({layer for g in grid.values() for layer in g})
    fig, ax = plt.subplots(figsize=(6.5, 3.2), dpi=110)
    for kind, g in sorted(grid.items()):
        ax.plot(layers, [g.get(layer, 0) for layer in layers], marker="o", label=kind)
    ax.set_xlabel("layer")
    ax.set_ylabel("shared rank")
    ax.set_title(f"cluster {cluster['id']}: rank per module chosen for the target error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_rank_sweep(rows: list[dict], path: Path, *, own: dict | None = None, title: str = "") -> Path:
    """Agreement with the originals against shared rank (mean, worst, reply; this adapter's when given), and the
    compression ratio on a second axis: the figure a rank is chosen from."""
    plt = _pyplot()
    ranks = [r["rank"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.6), dpi=110)
    ax.plot(ranks, [r["mean_next_token_agreement"] for r in rows], "o-", label="mean next-token agreement")
    ax.plot(ranks, [r["min_next_token_agreement"] for r in rows], "s--", label="worst adapter")
    ax.plot(ranks, [r["mean_reply_agreement"] for r in rows], "d-.", label="mean reply agreement")
    if own:
        ax.plot(ranks, [own[str(r)]["next_token_agreement"] for r in ranks], "*-", color="black", label="this adapter")
    ax.axhline(0.85, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("shared rank")
    ax.set_ylabel("agreement with the original")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(ranks)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(ranks, [r["compression_ratio"] for r in rows], "^:", color="tab:green", label="fewer parameters (x)")
    ax2.set_ylabel("fewer parameters (x)", color="tab:green")
    handles, labels = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(handles + more[0], labels + more[1], loc="lower right", fontsize=7)
    ax.set_title(title or "agreement against shared rank", fontsize=10)
    return _finish(fig, path)
