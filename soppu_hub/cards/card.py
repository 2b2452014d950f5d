"""Model card for one compressed adapter repo: metadata, body from cards/adapter.md, plots."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..compression.verify import REPLY_TOKENS
from ..peft_format.layout import (
    AGREEMENT_PNG,
    CARD_NAME,
    ERRORS_PNG,
    PARAMS_PNG,
    RANKS_PNG,
    REPORT_NAME,
    vllm_max_lora_rank,
)
from . import TEMPLATES
from .plots import ClusterFigures, plot_rank_sweep, plot_ranks

TEMPLATE = TEMPLATES / "adapter.md"
TAGS = ["soppu", "lora", "peft", "compression", "joint-diagonalization"]
TIMINGS = ("seconds",)  # report keys that differ from run to run with the same result
MAX_PEERS = 50  # adapters of the same cluster listed in a card's table and a repo's report.json


@functools.lru_cache(maxsize=1)
def _template():
    """cards/adapter.md compiled once (compiling it per card cost more than rendering it)."""
    import jinja2

    return jinja2.Template(TEMPLATE.read_text())


def peers(report: dict, index: int) -> list[dict]:
    """Compact entries of up to MAX_PEERS adapters of this adapter's cluster (this one always), in run order."""
    own = report["adapters"][index].get("cluster")
    others = [j for j, a in enumerate(report["adapters"]) if j != index and a.get("cluster") == own][: MAX_PEERS - 1]
    keys = ("name", "source", "output", "cluster", "params_before", "mean_rel_error", "max_rel_error", "verify")
    return [{k: report["adapters"][j][k] for k in keys if k in report["adapters"][j]} for j in sorted([index, *others])]


def repo_report(report: dict, index: int) -> dict:
    """What one repo carries: the run's summary, this adapter in full, its cluster's peers in brief. Keeps a
    thousand repos from each holding the whole run (which grows with the square of the collection). Run timings
    stay out: what a repo carries depends only on its inputs and settings, so a rerun can tell it is unchanged."""
    top = {k: v for k, v in report.items() if k not in ("adapters", *TIMINGS)}
    return {**top, "adapter": report["adapters"][index], "adapters": peers(report, index)}


def _hub_url(repo_or_path: str) -> str:
    """A repo id as a site-relative link (`/owner/name`): right on huggingface.co and on any Hub mirror, never a
    host that is gone (the demo's loopback Hub); a local path as it is."""
    return f"/{repo_or_path}" if "/" in repo_or_path and not Path(repo_or_path).exists() else repo_or_path


def verdict(agreement: float, ratio: float, reply: float | None = None) -> str:
    """One sentence on the functional check, for people: how much of the adapter's behaviour survived."""
    kept = "kept" if agreement >= 0.85 else "partly kept" if agreement >= 0.6 else "largely lost"
    along = f" ({reply:.0%} along the original's own replies)" if reply is not None else ""
    return (f"Behaviour {kept}: the compressed adapter picks the original's next token {agreement:.0%} of the time"
            f"{along}, at {ratio:.2f}x fewer parameters for the whole collection.")


BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def source_license(folder: Path) -> dict:
    """license / license_name / license_link from a source adapter's own card; {} when it states none."""
    from huggingface_hub import ModelCard

    path = folder / CARD_NAME
    if not path.is_file():
        return {}
    try:
        data = ModelCard.load(path, ignore_metadata_errors=True).data
    except Exception:  # a card we cannot parse states no license we could honour
        return {}
    return {k: getattr(data, k, None) for k in ("license", "license_name", "license_link") if getattr(data, k, None)}


def write_card(folder: Path, report: dict, index: int, *, repo_id: str | None, base_model: str | None, sources: list[str],
               command: str, weighting: str, local_path: str | None = None, license: dict | None = None,
               figures: ClusterFigures | None = None) -> Path:
    """Render README.md, report.json and the PNG plots into `folder` (the repo's root).

    `repo_id` for a pushed repo; `local_path` (absolute) for a --no-push run, whose snippets load the folder.
    `license`: the source card's license fields; "unknown" when it states none. `figures`: the cluster's
    figures when many cards are written (made here otherwise).
    """
    from huggingface_hub import ModelCardData

    own = report["adapters"][index]
    clusters = report.get("clusters") or []
    cluster = next((c for c in clusters if c["id"] == own.get("cluster")), None)
    made = figures is None
    if made:
        figures = ClusterFigures(report, [j for j, a in enumerate(report["adapters"]) if a.get("cluster") == own.get("cluster")])
    try:
        figures.errors(index, folder / ERRORS_PNG)
        figures.params(index, folder / PARAMS_PNG)
    finally:
        if made:
            figures.close()
    ranks_png = None
    if report.get("target_error") is not None and cluster is not None:
        ranks_png = RANKS_PNG
        plot_ranks(cluster, folder / RANKS_PNG)
    sweep_png = None
    if report.get("rank_sweep"):
        sweep_png = AGREEMENT_PNG
        v = own.get("verify") or {}
        curve = {**v.get("by_rank", {}), str(report["rank"]): v} if v else None
        plot_rank_sweep(report["rank_sweep"], folder / AGREEMENT_PNG, own=curve,
                        title=f"{own['name']}: agreement against shared rank (all {len(report['adapters'])} adapters)")
    license = license or {"license": "unknown"}
    data = ModelCardData(
        **license,
        base_model=base_model,
        library_name="peft",
        tags=TAGS,
        base_model_relation="adapter",
        soppu={"sources": sources, "method": report["method"], "rank": report["rank"],
               "compression_ratio": round(report["compression_ratio"], 4), "mean_rel_error": round(own["mean_rel_error"], 6),
               "max_rel_error": round(own["max_rel_error"], 6), "version": __version__,
               "cluster": own.get("cluster", 0), "cluster_size": cluster["size"] if cluster else len(report["adapters"]),
               "clusters": max(1, len(clusters))},
    )
    listed = peers(report, index)
    v = own.get("verify")
    width = BYTES.get(report["export"]["dtype"], 4)
    content = _template().render(
        verdict=verdict(v["next_token_agreement"], report["compression_ratio"], v.get("reply_agreement")) if v else None,
        export_mb=own["export_params"] * width / 1e6,
        original_mb=own["params_before"] * width / 1e6,
        bundle_params=cluster["params"] if cluster else report["params_after"] - report["carried_params"],
        card_data=data.to_yaml(),
        repo_id=repo_id or own["name"],
        adapter_id=repo_id or local_path,
        adapter_source="hub" if repo_id else "local",
        local_dir=str(Path(local_path).parent) if local_path else None,
        license=license,
        vllm_rank=vllm_max_lora_rank(own["export_rank"]),
        exact_tps=own["lorax_exact_tp"],
        name=own["name"],
        own=own,
        report=report,
        n_adapters=len(report["adapters"]),
        cluster=cluster,
        n_clusters=max(1, len(clusters)),
        peers=listed,
        sweep_png=sweep_png,
        unlisted=(cluster["size"] if cluster else len(report["adapters"])) - len(listed),
        sources=[{"source": s, "url": _hub_url(s)} for s in sources],
        base_model=base_model or "unknown",
        base_url=_hub_url(base_model or ""),
        version=__version__,
        export_rank=own["export_rank"],
        weighting=weighting,
        command=command,
        errors_png=ERRORS_PNG,
        params_png=PARAMS_PNG,
        ranks_png=ranks_png,
        has_verify=any(a.get("verify") for a in listed),
        verify_prompts=next((a["verify"]["prompts"] for a in listed if a.get("verify")), 0),
        reply_tokens=REPLY_TOKENS,
    )
    path = folder / CARD_NAME
    path.write_text(content)
    (folder / REPORT_NAME).write_text(json.dumps(repo_report(report, index), indent=2))
    return path


@dataclass
class CardJob:
    """One card to write, everything but the report (which a worker receives once)."""

    folder: Path
    index: int
    repo_id: str | None
    base_model: str | None
    sources: list[str]
    command: str
    weighting: str
    local_path: str | None
    license: dict


_REPORT: dict = {}


def _init_worker(report: dict) -> None:
    _REPORT["report"] = report


def _write_cluster_chunk(jobs: list[CardJob], report: dict | None = None) -> int:
    """Cards of adapters of one cluster on one set of figures; in a worker process the report came at start-up."""
    report = report if report is not None else _REPORT["report"]
    cluster = report["adapters"][jobs[0].index].get("cluster")
    figures = ClusterFigures(report, [j for j, a in enumerate(report["adapters"]) if a.get("cluster") == cluster])
    try:
        for job in jobs:
            write_card(job.folder, report, job.index, repo_id=job.repo_id, base_model=job.base_model, sources=job.sources,
                       command=job.command, weighting=job.weighting, local_path=job.local_path, license=job.license,
                       figures=figures)
    finally:
        figures.close()
    return len(jobs)


PARALLEL_CARDS = 64  # below this many cards, worker start-up costs more than it saves


def write_cards(jobs: list[CardJob], report: dict, *, workers: int = 1, progress=None) -> None:
    """All cards, cluster by cluster; with many cards and workers > 1, in worker processes (spawned, so no
    torch state is forked), each drawing a share of a cluster on figures it builds once."""
    import math
    import os

    chunks: list[list[CardJob]] = []
    by_cluster: dict[object, list[CardJob]] = {}
    for job in jobs:
        by_cluster.setdefault(report["adapters"][job.index].get("cluster"), []).append(job)
    workers = max(1, min(workers, os.cpu_count() or 1))
    parallel = workers > 1 and len(jobs) >= PARALLEL_CARDS
    for members in by_cluster.values():
        size = math.ceil(len(members) / workers) if parallel else len(members)
        chunks += [members[i : i + max(size, 16)] for i in range(0, len(members), max(size, 16))]
    done = 0
    if not parallel:
        for chunk in chunks:
            done += _write_cluster_chunk(chunk, report)
            if progress:
                progress(done, len(jobs))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(report,)) as pool:
        for n in pool.map(_write_cluster_chunk, chunks):
            done += n
            if progress:
                progress(done, len(jobs))
