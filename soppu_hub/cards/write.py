"""Write cards into repo folders: draw each card's plots, render its text, keep a compact report.json; many cards
in spawned worker processes, cluster by cluster."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from ..compression.report import Report
from ..peft_format.layout import AGREEMENT_PNG, CARD_NAME, ERRORS_PNG, PARAMS_PNG, RANKS_PNG, REPORT_NAME
from .plots import ClusterFigures, plot_rank_sweep, plot_ranks
from .render import CardSpec, render_card, repo_report


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


def write_card(job: CardSpec, report: Report, figures: ClusterFigures | None = None) -> Path:
    """README.md, report.json and the PNG plots into `job.folder` (the repo's root). `figures`: the cluster's
    figures when many cards are written (made here otherwise)."""
    folder, index = job.folder, job.index
    own = report.adapters[index]
    cluster = next((c for c in report.clusters if c["id"] == own.cluster), None)
    made = figures is None
    if made:
        figures = ClusterFigures(report, report.members(own.cluster))
    try:
        figures.errors(index, folder / ERRORS_PNG)
        figures.params(index, folder / PARAMS_PNG)
    finally:
        if made:
            figures.close()
    ranks_png = None
    if report.target_error is not None and cluster is not None:
        ranks_png = RANKS_PNG
        plot_ranks(cluster, folder / RANKS_PNG)
    sweep_png = None
    if report.rank_sweep:
        sweep_png = AGREEMENT_PNG
        v = own.verify or {}
        curve = {**v.get("by_rank", {}), str(report.rank): v} if v else None
        plot_rank_sweep(
            report.rank_sweep,
            folder / AGREEMENT_PNG,
            own=curve,
            title=f"{own.name}: agreement against shared rank (all {len(report.adapters)} adapters)",
        )
    path = folder / CARD_NAME
    path.write_text(render_card(report, job, ranks_png=ranks_png, sweep_png=sweep_png))
    (folder / REPORT_NAME).write_text(json.dumps(repo_report(report, index)))  # one line: a thousand repos carry one
    return path


@functools.lru_cache(maxsize=1)
def _report_file(path: str) -> Report:
    """A worker reads the run's report once, from the file its parent wrote (not pickled with every chunk)."""
    return Report.from_dict(json.loads(Path(path).read_text()))


def _write_cluster_chunk(jobs: list[CardSpec], report: Report | str) -> int:
    """Cards of adapters of one cluster on one set of figures; `report` itself, or in a worker the path of its file."""
    report = _report_file(report) if isinstance(report, str) else report
    figures = ClusterFigures(report, report.members(report.adapters[jobs[0].index].cluster))
    try:
        for job in jobs:
            write_card(job, report, figures)
    finally:
        figures.close()
    return len(jobs)


PARALLEL_CARDS = 64  # below this many cards, worker start-up costs more than it saves


def write_cards(jobs: list[CardSpec], report: Report, *, workers: int = 1, progress=None) -> None:
    """All cards, cluster by cluster; with many cards and workers > 1, in worker processes (spawned, so no
    torch state is forked), each drawing a share of a cluster on figures it builds once."""
    import math
    import os

    chunks: list[list[CardSpec]] = []
    by_cluster: dict[object, list[CardSpec]] = {}
    for job in jobs:
        by_cluster.setdefault(report.adapters[job.index].cluster, []).append(job)
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
    import tempfile
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    with tempfile.TemporaryDirectory(prefix="soppu-cards-") as tmp:
        path = Path(tmp) / "report.json"
        path.write_text(report.to_json(indent=None))
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for n in pool.map(partial(_write_cluster_chunk, report=str(path)), chunks):
                done += n
                if progress:
                    progress(done, len(jobs))
