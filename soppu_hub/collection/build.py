"""A collection folder from a compression: each cluster's bases and members files, centroids, collection.json.

Members' own folders then carry only their cores, with a reference to the collection (bundle version 3).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..compression.assign import probe_modules, signatures
from ..compression.bundle import Bundle
from ..compression.cluster import normalise
from ..compression.plan import Compression
from ..compression.quantize import Store
from ..compression.report import Report
from .format import CENTROIDS_FILE, ClusterInfo, CollectionInfo, Member, save_bases, write_collection, write_members


def cluster_centroids(sig: torch.Tensor, labels: list[int], clusters: int) -> torch.Tensor:
    """(K, features): each cluster's mean unit signature, made unit again."""
    rows = [sig[[i for i, c in enumerate(labels) if c == k]].mean(0) for k in range(clusters)]
    return normalise(torch.stack(rows))


def save_centroids(path: Path, centroids: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"centroids": centroids.float().contiguous()}, str(path))


def write_collection_folder(
    folder: Path,
    comp: Compression,
    written: list[Bundle],
    ids: list[str],
    report: Report,
    *,
    repo_ids: list[str | None],
    command: str,
    store: Store | None = None,
) -> CollectionInfo:
    """Everything a joiner needs, nothing of any member's adapter: bases per cluster (as the `store` keeps them),
    centroids of the members' signatures over probe modules, the settings, and the members (how = compress)."""
    adapters = comp.adapters
    modules = list(dict.fromkeys(m for a in adapters for m in a.modules))
    probes = probe_modules(adapters, modules)
    sig = normalise(signatures(adapters, modules, probes))
    save_centroids(folder / CENTROIDS_FILE, cluster_centroids(sig, comp.cluster_of, len(written)))
    entries = report.adapters
    clusters = []
    for c, wb in enumerate(written):
        info = ClusterInfo(c, ids[c], max(e.mean_rel_error for e in entries if e.cluster == c))
        save_bases(folder / info.file, {n: (mb.U, mb.V) for n, mb in wb.modules.items()}, ids[c], store)
        clusters.append(info)
    shapes = {m: list(next(a.modules[m].shape for a in adapters if m in a.modules)) for m in modules}
    info = CollectionInfo(
        adapters[0].base_model,
        comp.config.method,
        comp.config.rank,
        comp.config.target_error,
        shapes,
        probes,
        clusters,
        settings=dataclasses.asdict(comp.config),
        command=command,
        store=store.header() if store is not None else None,
    )
    write_collection(folder, info)
    write_members(
        folder,
        info,
        [
            Member(e.name, e.cluster, e.mean_rel_error, e.max_rel_error, e.source, "compress", repo_id=r)
            for e, r in zip(entries, repo_ids)
        ],
    )
    return info
