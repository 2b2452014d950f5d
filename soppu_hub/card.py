"""Model card for one compressed adapter repo: metadata, body from cards/adapter.md, plots."""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .layout import CARD_NAME, ERRORS_PNG, PARAMS_PNG, REPORT_NAME, vllm_max_lora_rank
from .plots import plot_errors_by_layer, plot_params

# soppu_hub/cards links to the repo's top-level cards/ (and is a real folder inside a built wheel)
TEMPLATE = Path(__file__).parent / "cards" / "adapter.md"
TAGS = ["soppu", "lora", "peft", "compression", "joint-diagonalization"]


def _hub_url(repo_or_path: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{repo_or_path}" if "/" in repo_or_path and not Path(repo_or_path).exists() else repo_or_path


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
               command: str, weighting: str, local_path: str | None = None, license: dict | None = None) -> Path:
    """Render README.md and the PNG plots into `folder` (the repo's root).

    `repo_id` for a pushed repo; `local_path` (absolute) for a --no-push run, whose snippets load the folder.
    `license`: the source card's license fields; "unknown" when it states none.
    """
    from huggingface_hub import ModelCard, ModelCardData

    plot_errors_by_layer(report, index, folder / ERRORS_PNG)
    plot_params(report, index, folder / PARAMS_PNG)
    own = report["adapters"][index]
    license = license or {"license": "unknown"}
    data = ModelCardData(
        **license,
        base_model=base_model,
        library_name="peft",
        tags=TAGS,
        base_model_relation="adapter",
        soppu={"sources": sources, "method": report["method"], "rank": report["rank"],
               "compression_ratio": round(report["compression_ratio"], 4), "mean_rel_error": round(own["mean_rel_error"], 6),
               "max_rel_error": round(own["max_rel_error"], 6), "version": __version__},
    )
    verify = [a.get("verify") for a in report["adapters"]]
    card = ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        repo_id=repo_id or own["name"],
        adapter_id=repo_id or local_path,
        adapter_source="hub" if repo_id else "local",
        local_dir=str(Path(local_path).parent) if local_path else None,
        license=license,
        vllm_rank=vllm_max_lora_rank(own["export_rank"]),
        name=own["name"],
        own=own,
        report=report,
        sources=[{"source": s, "url": _hub_url(s)} for s in sources],
        base_model=base_model or "unknown",
        base_url=_hub_url(base_model or ""),
        version=__version__,
        export_rank=own["export_rank"],
        weighting=weighting,
        command=command,
        errors_png=ERRORS_PNG,
        params_png=PARAMS_PNG,
        has_verify=any(verify),
        verify_prompts=next((v["prompts"] for v in verify if v), 0),
    )
    path = folder / CARD_NAME
    card.save(path)
    (folder / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return path
