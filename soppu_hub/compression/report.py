"""The run's report: typed (`Report`, one `AdapterReport` per input), written as report.json (a fixed shape other
tools read) and summed up as a text table."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

from ..peft_format.layout import lorax_exact_tps

if TYPE_CHECKING:  # torch stays unimported where a report is only read (a card worker, a bench table)
    from .export import ExportConfig, ExportInfo
    from .plan import Compression
    from .quantize import Store


@dataclass
class Output:
    """Where one input adapter's compressed result went (folder or Hub repo id)."""

    name: str
    source: str
    output: str


@dataclass
class AdapterReport:
    """One input adapter's entry in report.json ("adapters"); fields in the file's order."""

    name: str
    source: str
    output: str  # the folder or Hub repo id it was written to
    params_before: int
    lora_params: int
    carried_params: int  # tensors carried as they are (embeddings, heads): counted on both sides
    carried: list[str]
    export_rank: int  # lorax_fields: config r, the rank it needs, the zeros, the sizes LoRAX runs exactly
    unpadded_rank: int
    padding_params: int
    lorax_exact_tp: list[int]
    export_params: int
    export_dtype: str
    bytes_before: int  # the original's tensors in its own dtype
    export_bytes: int
    repo_bytes: int
    mean_rel_error: float  # of the factors as written
    max_rel_error: float
    fit_mean_rel_error: float  # of the fit, before the store rounded or quantized it
    modules: dict[str, dict[str, float]]  # module -> {"rel_error": e}
    cluster: int
    private_directions: int
    verify: dict | None = None  # --verify: evaluate.verify's functional check
    task_eval: dict | None = None  # --eval-file: evaluate.task_eval's scores on the user's examples
    module_ranks: list[int] = field(default_factory=list)  # lorax_fields: [smallest, largest] rank written


@dataclass
class Report:
    """A compress run's numbers; `to_dict` is report.json's shape (optional parts only when present)."""

    method: str
    rank: int
    device: str
    seconds: float
    params_before: int
    params_after: int
    carried_params: int
    compression_ratio: float
    bytes_before: int
    store: dict  # {"dtype", "group" (quantized only), "bytes_per_number"}
    store_bytes: int  # the shared store: bases once, cores and private directions, carried tensors
    compression_ratio_bytes: float
    export: dict  # export_fields
    clusters: list[dict]  # per cluster: id, size, rank, params, ranks per module
    target_error: float | None
    budget: int | None
    choice: dict  # choice_summary
    adapters: list[AdapterReport]
    poorly_kept: list[dict]  # adapters above --max-adapter-error, with advice
    collection: dict | None = None  # {"name", "revision"} when the bases went to a collection
    written: dict | None = None  # what the folder holds: bundle / repo parameters, tensor and repo bytes
    rank_sweep: list[dict] | None = None  # --verify-ranks: agreement per shared rank

    OPTIONAL = ("collection", "written", "rank_sweep", "verify", "task_eval")

    def to_dict(self) -> dict:
        def drop(d: dict) -> dict:
            return {k: v for k, v in d.items() if not (k in Report.OPTIONAL and v is None)}

        body = drop(asdict(self))
        body["adapters"] = [drop(a) for a in body["adapters"]]
        return body

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, body: dict) -> Report:
        names = {f.name for f in fields(AdapterReport)}
        adapters = [AdapterReport(**{k: v for k, v in a.items() if k in names}) for a in body["adapters"]]
        return cls(**{**{f.name: body.get(f.name) for f in fields(cls)}, "adapters": adapters})

    def members(self, cluster: int) -> list[int]:
        """Indices of the adapters of one cluster, in run order."""
        return [i for i, a in enumerate(self.adapters) if a.cluster == cluster]


def build_report(
    comp: Compression,
    outputs: list[Output],
    exports: list[ExportInfo],
    errors: list[dict[str, float]],
    export: ExportConfig,
    *,
    store: Store | None = None,
) -> Report:
    """The report. rel_error = ||W_i - B' A'||_F / ||W_i||_F for the exported factors as written (dtype
    and padding included), PEFT scaling included, not squared.

    params_before / params_after count carried tensors on both sides; padding zeros are not parameters. Bytes are
    what users pay for: bytes_before the originals' tensors in their own dtypes, store_bytes the shared store (bases
    once and cores at the `store`'s bytes per number, carried tensors in their own dtypes), export_bytes / repo_bytes
    per adapter as written. fit_mean_rel_error is the fit's error before the store rounded or quantized it: the
    difference is what the store cost on its own.
    """
    from .quantize import Store

    store = store or Store()
    adapters = []
    for adapter, out, info, errs in zip(comp.adapters, outputs, exports, errors):
        i = len(adapters)
        adapters.append(
            AdapterReport(
                name=out.name,
                source=out.source,
                output=out.output,
                params_before=adapter.num_params,
                lora_params=adapter.lora_params,
                carried_params=adapter.carried_params,
                carried=adapter.carried_names,
                **lorax_fields(info, export),
                export_params=info.lora_params,
                export_dtype=_name(info.dtype),
                bytes_before=adapter.num_params * adapter.dtype.itemsize,
                export_bytes=(info.lora_params + adapter.carried_params) * info.dtype.itemsize,
                repo_bytes=info.repo_bytes,
                mean_rel_error=statistics.fmean(errs.values()),
                max_rel_error=max(errs.values()),
                fit_mean_rel_error=_fit_error(comp, i),
                modules={name: {"rel_error": e} for name, e in errs.items()},
                cluster=comp.cluster_of[i],
                private_directions=comp.refined.private.get(i, 0) if comp.refined else 0,
            )
        )
    before, after = comp.params_before, comp.params_after
    bytes_before = sum(a.bytes_before for a in adapters)
    carried = sum(a.carried_params * a.dtype.itemsize for a in comp.adapters)
    store_bytes = round((after - comp.carried_params) * store.bytes_per_number) + carried
    dtypes = sorted({a.export_dtype for a in adapters})
    return Report(
        method=comp.config.method,
        rank=comp.config.rank,
        device=comp.device,
        seconds=round(comp.seconds, 4),
        params_before=before,
        params_after=after,
        carried_params=comp.carried_params,
        compression_ratio=before / after,
        bytes_before=bytes_before,
        store={
            "dtype": store.name,
            **({"group": store.group} if store.quantized else {}),
            "bytes_per_number": store.bytes_per_number,
        },
        store_bytes=store_bytes,
        compression_ratio_bytes=bytes_before / store_bytes,
        export=export_fields(export, dtypes),
        clusters=[
            {
                "id": c,
                "size": len(comp.members(c)),
                "rank": max((mb.rank for mb in b.modules.values()), default=0),
                "params": b.num_params,
                "ranks": {name: mb.rank for name, mb in b.modules.items()},
            }
            for c, b in enumerate(comp.bundles)
        ],
        target_error=comp.config.target_error,
        budget=comp.config.budget,
        choice=choice_summary(comp),
        adapters=adapters,
        poorly_kept=poorly_kept(adapters, comp),
    )


def _fit_error(comp: Compression, i: int) -> float:
    """Adapter i's mean relative error as fitted, before the store: the kernel's per-module errors."""
    errs = [ms.rel_errors[i] for ms in comp.stats.values() if i in ms.rel_errors]
    return statistics.fmean(errs) if errs else float("nan")


def lorax_fields(info: ExportInfo, export: ExportConfig) -> dict:
    """What one export means to LoRAX, the same keys for compressed, joined and refit members: config r and the
    rank it needs, the zeros written, the --num-shard sizes (of those the base allows) that run it unchanged, the
    range of ranks its modules are written at."""
    return {
        "export_rank": info.rank,
        "unpadded_rank": info.unpadded_rank,
        "padding_params": info.padding_params,
        "lorax_exact_tp": list(lorax_exact_tps(info.rank, info.ranks, export.lorax_sizes)),
        "module_ranks": [info.ranks[0], info.ranks[-1]],
    }


def export_fields(export: ExportConfig, dtypes: list[str]) -> dict:
    """How the exports were written: dtype(s), padding and for which size, the sizes LoRAX runs the base at."""
    return {
        "dtype": dtypes[0] if len(dtypes) == 1 else "mixed",
        "dtypes": dtypes,
        "pad": "lorax" if export.pad else "none",
        "layout": "uniform" if export.uniform else "per-module",
        "lorax_tp": export.pad_tp,
        "lorax_sizes": list(export.lorax_sizes) if export.lorax_sizes is not None else None,
    }


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def choice_summary(comp: Compression) -> dict:
    """What was chosen and why: clusters (and how K was priced, every K tried, the runner-up), the shared rank per
    cluster and module, the private directions per adapter."""
    out = {
        "clusters": len(comp.bundles),
        "shared_only": comp.config.shared_only,
        "private_directions": sum(comp.refined.private.values()) if comp.refined else 0,
        "adapters_with_private": sum(1 for p in comp.refined.private.values() if p) if comp.refined else 0,
    }
    if comp.choice is not None:
        out.update(priced_by=comp.choice["priced_by"], scan=comp.choice["scan"], runner_up=comp.choice["runner_up"])
    return out


def choice_lines(report: Report) -> list[str]:
    """What the terminal says about the choice: K (and the runner-up), private directions."""
    ch, out = report.choice or {}, []
    if ch.get("scan"):
        runner = ch.get("runner_up")
        out.append(
            f"--clusters auto: {ch['clusters']} cluster(s), priced by {ch['priced_by']} over K = "
            f"{', '.join(str(r['K']) for r in ch['scan'])}"
            + (
                f"; runner-up K = {runner['K']} (probe modules: {int(runner['stored']):,} parameters, mean error "
                f"{runner['mean_error']:.4f})"
                if runner
                else ""
            )
        )
    if ch.get("private_directions"):
        out.append(
            f"private directions: {ch['private_directions']:,} over {ch['adapters_with_private']} of "
            f"{len(report.adapters)} adapters (kept beside the shared bases where those miss them)"
        )
    return out


def poorly_kept(adapters: list[AdapterReport], comp: Compression) -> list[dict]:
    """Adapters left above --max-adapter-error, each with the two ways on: a cluster of its own, or a larger rank."""
    limit, k = comp.config.max_adapter_error, len(comp.bundles)
    return [
        {
            "name": a.name,
            "mean_rel_error": a.mean_rel_error,
            "cluster": a.cluster,
            "advice": f"{a.name}: mean relative error {a.mean_rel_error:.3f} is above --max-adapter-error "
            f"{limit:g} (its cluster's bases miss its directions); give it a cluster of its own "
            f"(--clusters {k + 1} or auto) or a larger --rank (now {comp.config.rank})",
        }
        for a in adapters
        if a.mean_rel_error > limit
    ]


def format_table(report: Report) -> str:
    """Fixed-width summary for the terminal."""
    rows = [("adapter", "params", "mean rel err", "max rel err", "output")]
    for a in report.adapters:
        rows.append((a.name, f"{a.params_before:,}", f"{a.mean_rel_error:.4f}", f"{a.max_rel_error:.4f}", a.output))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    clusters = report.clusters or []
    if len(clusters) > 1:
        lines.append(f"{len(clusters)} clusters of sizes {', '.join(str(c['size']) for c in clusters)}")
    lines += choice_lines(report)
    lines += [f"warning: {p['advice']}" for p in report.poorly_kept]
    if report.written is not None:
        w = report.written
        each = (
            "its cores and a PEFT export; the bases are in the collection once"
            if report.collection
            else "its cluster's bases and a PEFT export"
        )
        lines.append(
            f"written: {w['tensor_bytes'] / 1e6:.1f} MB of tensors (the bundle {w['bundle_params']:,} parameters; "
            f"the {len(report.adapters)} repos {w['repo_bytes'] / 1e6:.1f} MB against the originals' "
            f"{report.bytes_before / 1e6:.1f} MB: each carries {each})"
        )
    lines.append(
        f"JD-{report.method} rank {report.rank} on {report.device} in {report.seconds:.2f}s: "
        f"{report.params_before:,} -> {report.params_after:,} parameters "
        f"({report.compression_ratio:.2f}x); {report.bytes_before / 1e6:.2f} -> "
        f"{report.store_bytes / 1e6:.2f} MB "
        f"stored once as {report.store['dtype']} ({report.compression_ratio_bytes:.2f}x in bytes)"
    )
    return "\n".join(lines)
