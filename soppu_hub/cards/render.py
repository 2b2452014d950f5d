"""A model card's text from the run's numbers: pure (data in, text out), no files, plots or Hub calls."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..peft_format.layout import ERRORS_PNG, PARAMS_PNG, TAG, vllm_max_lora_rank
from . import TEMPLATES

if TYPE_CHECKING:
    from ..compression.report import Report

TEMPLATE = TEMPLATES / "adapter.md"
TAGS = [TAG, "lora", "peft", "compression", "joint-diagonalization"]
TIMINGS = ("seconds",)  # report keys that differ from run to run with the same result
MAX_PEERS = 50  # adapters of the same cluster listed in a card's table and a repo's report.json


@dataclass
class CardSpec:
    """One card to write: where, for which adapter of the report, and what the report does not say."""

    folder: Path
    index: int
    repo_id: str | None  # the pushed repo; None for a --no-push run
    base_model: str | None
    sources: list[str]
    command: str
    weighting: str
    local_path: str | None  # absolute folder of a --no-push run, whose snippets load it
    license: dict  # the source card's license fields; {} when it states none
    note: str | None = None  # --card-note: a line at the top of the card


@functools.lru_cache(maxsize=4)
def _template(name: str = TEMPLATE.name):
    """A template of templates/ compiled once (compiling it per card cost more than rendering it); templates
    include each other by file name (use-it.md: the loading snippets every adapter card shows)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)))
    env.filters["cell"] = table_cell
    return env.get_template(name)


def table_cell(text: str) -> str:
    """Free text (a prompt, a reply) as one Markdown table cell: one line, pipes escaped, never empty."""
    return " ".join(str(text).split()).replace("|", "\\|") or "(nothing)"


def peers(report: Report, index: int) -> list[dict]:
    """Compact entries of up to MAX_PEERS adapters of this adapter's cluster (this one always), in run order."""
    others = [j for j in report.members(report.adapters[index].cluster) if j != index][: MAX_PEERS - 1]
    keys = (
        "name",
        "source",
        "output",
        "cluster",
        "params_before",
        "mean_rel_error",
        "max_rel_error",
        "verify",
        "task_eval",
    )
    rows = [vars(report.adapters[j]) for j in sorted([index, *others])]
    return [{k: row[k] for k in keys if row.get(k) is not None} for row in rows]


def repo_report(report: Report, index: int) -> dict:
    """What one repo carries: the run's summary, this adapter and its cluster in full, its cluster's peers and the
    other clusters in brief. Keeps a thousand repos from each holding the whole run (which grows with the square of
    the collection). Run timings stay out: what a repo carries depends only on its inputs and settings, so a rerun
    can tell it is unchanged."""
    body = report.to_dict()
    top = {k: v for k, v in body.items() if k not in ("adapters", *TIMINGS)}
    own = report.adapters[index].cluster
    if top.get("clusters"):  # other clusters in brief: their ranks per module are theirs to carry
        top["clusters"] = [
            c if c.get("id") == own else {k: v for k, v in c.items() if k != "ranks"} for c in top["clusters"]
        ]
    return {**top, "adapter": body["adapters"][index], "adapters": peers(report, index)}


def _hub_url(repo_or_path: str) -> str:
    """A repo id as a site-relative link (`/owner/name`): right on huggingface.co and on any Hub mirror, never a
    host that is gone (the demo's loopback Hub); a local path as it is."""
    return f"/{repo_or_path}" if "/" in repo_or_path and not Path(repo_or_path).exists() else repo_or_path


def verdict(agreement: float, ratio: float, reply: float | None = None) -> str:
    """One sentence on the functional check, for people: how much of the adapter's behaviour survived."""
    kept = "kept" if agreement >= 0.85 else "partly kept" if agreement >= 0.6 else "largely lost"
    along = f" ({reply:.0%} along the original's own replies)" if reply is not None else ""
    return (
        f"Behaviour {kept}: the compressed adapter picks the original's next token {agreement:.0%} of the time"
        f"{along}, at {ratio:.2f}x fewer parameters for the whole collection."
    )


def task_verdict(t: dict, ratio: float) -> str:
    """One sentence on the user's own examples: how much of the original's task score the compressed adapter keeps."""
    kept = t["chrf_retention"]
    share = f"keeps {kept:.0%} of the original's score" if kept is not None else "scores"
    return (
        f"On your {t['examples']} examples the compressed adapter {share} (chrF {t['compressed']['chrf']:.3f} against "
        f"{t['original']['chrf']:.3f}; exact match {t['compressed']['exact_match']:.3f} against "
        f"{t['original']['exact_match']:.3f}; the base model alone {t['base']['chrf']:.3f} / "
        f"{t['base']['exact_match']:.3f}), at {ratio:.2f}x fewer parameters for the whole collection."
    )


def lorax_row(exact: list[int], sizes: list[int] | None, *, padded_for: int | None) -> str:
    """The card's "LoRAX tensor parallel" cell, the same for compressed, joined and refit members: the --num-shard
    sizes LoRAX can run the base at (from its config; said when it could not be read), where this export runs
    exactly, and the re-export that makes another size exact. `padded_for`: the size padded for (None: --no-pad)."""
    head = (
        f"LoRAX runs the base at `--num-shard` {', '.join(map(str, sizes))}"
        if sizes is not None
        else "the base model's head counts could not be read, so the sizes LoRAX runs it at were not checked"
    )
    pad = f" (padded for {padded_for})" if padded_for else ""
    weak = [t for t in (sizes or []) if t not in exact]
    fix = f"re-export with `--lorax-tp {weak[0]}`" if weak else "re-export without `--no-pad`"
    if weak and padded_for is None:
        fix += " (and without `--no-pad`)"
    if not exact:
        every = "every one of them" if sizes is not None else "every size"
        return f"{head}; LoRAX pads this rank at {every} and serves the adapter too weak: {fix}"
    text = f"{head}; this export is exact at {', '.join(map(str, exact))}{pad}"
    return text + (
        f"; at {', '.join(map(str, weak))} LoRAX pads the rank and serves it too weak: {fix}" if weak else ""
    )


def module_ranks_text(ranks: list[int] | None) -> str:
    """The ranks an export's modules are written at, for a card: "rank 9" or "ranks 2 to 6"."""
    lo, hi = (ranks or [0, 0])[0], (ranks or [0, 0])[-1]
    return f"rank {lo}" if lo == hi else f"ranks {lo} to {hi}"


def render_card(report: Report, job: CardSpec, *, ranks_png: str | None, sweep_png: str | None) -> str:
    """README.md for adapter `job.index` of `report`: YAML metadata, then templates/adapter.md. `ranks_png` /
    `sweep_png`: the optional plots' paths when they were drawn."""
    from huggingface_hub import ModelCardData

    own = report.adapters[job.index]
    clusters = report.clusters
    cluster = next((c for c in clusters if c["id"] == own.cluster), None)
    license = job.license or {"license": "unknown"}
    repo_id, local_path, base_model = job.repo_id, job.local_path, job.base_model
    data = ModelCardData(
        **license,
        base_model=base_model,
        library_name="peft",
        tags=TAGS,
        base_model_relation="adapter",
        soppu={
            "sources": job.sources,
            "method": report.method,
            "rank": report.rank,
            "compression_ratio": round(report.compression_ratio, 4),
            "mean_rel_error": round(own.mean_rel_error, 6),
            "max_rel_error": round(own.max_rel_error, 6),
            "version": __version__,
            "cluster": own.cluster,
            "cluster_size": cluster["size"] if cluster else len(report.adapters),
            "clusters": max(1, len(clusters)),
        },
    )
    listed = peers(report, job.index)
    v = own.verify
    store_width = report.store_bytes / report.params_after
    return _template().render(
        note=" ".join((job.note or "").split()) or None,
        verdict=verdict(v["next_token_agreement"], report.compression_ratio, v.get("reply_agreement")) if v else None,
        task_verdict=task_verdict(own.task_eval, report.compression_ratio) if own.task_eval else None,
        task=own.task_eval,
        export_mb=own.export_bytes / 1e6,
        original_mb=own.bytes_before / 1e6,
        repo_mb=own.repo_bytes / 1e6,
        bundle_mb=(cluster["params"] if cluster else report.params_after - report.carried_params) * store_width / 1e6,
        card_data=data.to_yaml(),
        repo_id=repo_id or own.name,
        adapter_id=repo_id or local_path,
        adapter_source="hub" if repo_id else "local",
        local_dir=str(Path(local_path).parent) if local_path else None,
        license=license,
        vllm_rank=vllm_max_lora_rank(own.export_rank),
        lorax_row=lorax_row(
            own.lorax_exact_tp,
            report.export.get("lorax_sizes"),
            padded_for=report.export["lorax_tp"] if report.export["pad"] == "lorax" else None,
        ),
        name=own.name,
        own=own,
        report=report,
        n_adapters=len(report.adapters),
        cluster=cluster,
        n_clusters=max(1, len(clusters)),
        peers=listed,
        sweep_png=sweep_png,
        unlisted=(cluster["size"] if cluster else len(report.adapters)) - len(listed),
        sources=[{"source": s, "url": _hub_url(s)} for s in job.sources],
        base_model=base_model or "unknown",
        base_url=_hub_url(base_model or ""),
        version=__version__,
        export_rank=own.export_rank,
        module_ranks=module_ranks_text(own.module_ranks),
        weighting=job.weighting,
        command=job.command,
        errors_png=ERRORS_PNG,
        params_png=PARAMS_PNG,
        ranks_png=ranks_png,
        has_verify=any(a.get("verify") for a in listed),
        verify_prompts=next((a["verify"]["prompts"] for a in listed if a.get("verify")), 0),
        reply_tokens=next((a["verify"].get("reply_tokens") for a in listed if a.get("verify")), None),
        collection_url=_hub_url(report.collection["name"]) if report.collection else None,
    )


def render_join_card(entry: dict, job: CardSpec, *, params_before: int, core_params: int) -> str:
    """README.md of a member that joined a collection (`entry`: its report.json): which collection, revision and
    cluster, its error against the bar it met, and that its bases are shared, not in the repo."""
    from huggingface_hub import ModelCardData

    license = job.license or {"license": "unknown"}
    data = ModelCardData(
        **license,
        base_model=job.base_model,
        library_name="peft",
        tags=[*TAGS, "soppu-collection"],
        base_model_relation="adapter",
        soppu={
            "sources": job.sources,
            "collection": entry["collection"],
            "cluster": entry["cluster"],
            "how": entry["how"],
            "mean_rel_error": round(entry["mean_rel_error"], 6),
            "max_rel_error": round(entry["max_rel_error"], 6),
            "version": __version__,
        },
    )
    return _template("joined-adapter.md").render(
        card_data=data.to_yaml(),
        e=entry,
        repo_id=job.repo_id or entry["name"],
        name=entry["name"],
        adapter_id=job.repo_id or job.local_path,
        adapter_source="hub" if job.repo_id else "local",
        local_dir=str(Path(job.local_path).parent) if job.local_path else None,
        own={},
        collection_url=_hub_url(entry["collection"]),
        sources=[{"source": s, "url": _hub_url(s)} for s in job.sources],
        base_model=job.base_model or "unknown",
        base_url=_hub_url(job.base_model or ""),
        version=__version__,
        vllm_rank=vllm_max_lora_rank(entry["export_rank"]),
        export_rank=entry["export_rank"],
        module_ranks=module_ranks_text(entry.get("module_ranks")),
        license=license,
        params_before=params_before,
        core_params=core_params,
        command=job.command,
        lorax_row=lorax_row(
            entry["lorax_exact_tp"],
            entry["export"]["lorax_sizes"],
            padded_for=entry["export"]["lorax_tp"] if entry["export"]["pad"] == "lorax" else None,
        ),
    )
