"""The main job as one library call: pull -> compress -> card -> push. The CLI, demo and notebooks call this."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..compression.config import CompressConfig
from ..compression.export import export_peft
from ..compression.plan import Compression, Progress, compress
from ..compression.report import Report
from ..errors import SoppuError
from ..hub.common import is_repo_id
from ..hub.pull import Source, download_adapter, parse_source
from ..hub.push import PushResult, check_write_access, target_repo_ids, whoami
from ..peft_format.layout import REPORT_NAME
from ..peft_format.read import read_adapter
from ..progress import hub_bars_off
from .outputs import lorax_sizes, staged_output, write_outputs
from .publish import default_collection, push_outputs
from .spec import JobSpec


@dataclass
class JobResult:
    report: Report | None
    out: Path | None
    pushed: dict[str, PushResult] = field(default_factory=dict)  # repo id -> what its push did


def unique_names(names: list[str]) -> list[str]:
    """Make output names distinct in input order (a, a-2, a-3), ignoring case as the Hub and some file systems do,
    and never colliding with a later input's own name."""
    from collections import Counter

    counts = Counter(names)
    reserved = {n.lower() for n in names if counts[n] == 1}
    out: list[str] = []
    used: set[str] = set()
    for n in names:
        candidate, k = n, 1
        while candidate.lower() in used or (candidate != n and candidate.lower() in reserved):
            k += 1
            candidate = f"{n}-{k}"
        out.append(candidate)
        used.add(candidate.lower())
    return out


def _rank_variants(
    comp: Compression, names: list[str], spec: JobSpec, scratch: Path
) -> tuple[dict[int, list[Path]], dict[int, int]]:
    """Exports of the same fit cut to each smaller rank of --verify-ranks (not kept), and each cut's parameters."""
    variants, params = {}, {}
    local = comp.local_indices()
    for rank in sorted({r for r in spec.verify_ranks if 0 < r < spec.config.rank}):
        cut = [b.truncated(rank) for b in comp.bundles]
        variants[rank] = [scratch / str(rank) / n for n in names]
        for i, (folder, a) in enumerate(zip(variants[rank], comp.adapters)):
            dtype = spec.export.torch_dtype(a.dtype)
            export_peft(
                cut[comp.cluster_of[i]], local[i], folder, export=spec.export, dtype=dtype, extras=a.extras(dtype)
            )
        params[rank] = sum(b.num_params for b in cut) + comp.carried_params
    return variants, params


def _sweep_summary(params: dict[int, int], report: Report, checks: list[dict]) -> list[dict]:
    """Agreement against shared rank over all adapters: mean and worst, with the parameter ratio at each rank."""
    import statistics

    rows = []
    for rank in [*sorted(params), report.rank]:
        at = [c["by_rank"][str(rank)] if rank in params else c for c in checks]
        ratio = report.params_before / (params[rank] if rank in params else report.params_after)
        rows.append(
            {
                "rank": rank,
                "compression_ratio": ratio,
                "mean_next_token_agreement": statistics.fmean(a["next_token_agreement"] for a in at),
                "min_next_token_agreement": min(a["next_token_agreement"] for a in at),
                "mean_reply_agreement": statistics.fmean(a["reply_agreement"] for a in at),
            }
        )
    return rows


def _fetch(sources: list[Source], spec: JobSpec, progress: Progress | None = None) -> list[Path]:
    """Local folders as they are; Hub sources downloaded `spec.workers` at a time (the first failure stops it)."""
    from concurrent.futures import ThreadPoolExecutor

    remote = [s for s in sources if not s.path]
    done = 0

    def one(s: Source) -> Path:
        return download_adapter(s.repo_id, revision=s.revision, token=spec.token)

    got: dict[int, Path] = {}
    if remote:
        with hub_bars_off("huggingface_hub.http_get"):  # per-file byte bars: one "downloading" bar instead
            with ThreadPoolExecutor(max_workers=max(1, spec.workers)) as pool:
                try:
                    for s, path in zip(remote, pool.map(one, remote)):
                        got[id(s)] = path
                        done += 1
                        if progress:
                            progress(done, len(remote))
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    return [s.path if s.path else got[id(s)] for s in sources]


def run_job(
    spec: JobSpec,
    *,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    cards_progress: Progress | None = None,
    download_progress: Progress | None = None,
    push_progress: Progress | None = None,
    verify_progress: Progress | None = None,
    export_progress: Progress | None = None,
    score_progress: Progress | None = None,
) -> JobResult:
    """Check everything that can be checked first (sources, push rights), then do the work, then push."""
    log = log or (lambda _: None)
    spec.config = spec.config.for_inputs(len(spec.sources))  # --rank, --clusters defaults made concrete for the card
    spec.config.validate(len(spec.sources))
    spec.export.validate()
    if not spec.push and spec.out is None:
        raise SoppuError("--no-push needs --out to keep the results somewhere")
    sources = [parse_source(s, spec.revision) for s in spec.sources]
    names = unique_names([s.name for s in sources])
    sets, probes = None, None  # the user's files, checked before anything is downloaded
    if spec.eval_file:
        from ..evaluate.task_eval import eval_sets

        sets = eval_sets(spec.eval_file, names)
    if spec.probe_file:
        if not spec.verify:
            raise SoppuError("--probe-file needs --verify (its prompts replace the built-in probes)")
        from ..evaluate.task_eval import read_probe_file

        probes = read_probe_file(spec.probe_file)
    targets: list[str] = names
    if spec.push:
        user, writable = whoami(spec.token)
        targets = spec.repo_ids or target_repo_ids(names, user=user, push_to=spec.push_to, namespace=spec.namespace)
        if spec.collection is None and len(targets) > 1 and not spec.own_bases:
            spec.collection = default_collection(targets)
        check_write_access(targets + ([spec.collection] if spec.collection else []), writable, user)
    if spec.collection and not is_repo_id(spec.collection):
        raise SoppuError(f"--collection {spec.collection!r} is not a repo id; name it owner/name")
    if spec.collection and spec.push:
        from ..collection.publish import check_collection_target

        check_collection_target(spec.collection, targets, refit=spec.refit, token=spec.token)

    folders = _fetch(sources, spec, download_progress)
    # headers only: every input is checked before any compute, factors are read one module position at a time
    adapters = [read_adapter(f, name=n, source=s.text, stream=True) for f, n, s in zip(folders, names, sources)]
    for flag, wanted in (("--verify", spec.verify), ("--eval-file", spec.eval_file)):
        for a in adapters if wanted else []:
            if a.config.get("task_type") not in (None, "CAUSAL_LM"):
                what = "compares next-token predictions of" if flag == "--verify" else "scores replies of"
                raise SoppuError(
                    f"{a.name}: {flag} {what} causal LMs, but this is a {a.config['task_type']} adapter; "
                    f"run without {flag}"
                )
    base = spec.base_model or adapters[0].base_model
    if (spec.verify or sets) and not base:
        raise SoppuError(
            f"{'--verify' if spec.verify else '--eval-file'} needs the base model: the adapter config names "
            "none, pass --base-model"
        )
    spec.export = spec.export.for_base(lorax_sizes(base, spec.token), base)
    out = Path(spec.out) if spec.out is not None else None
    result = JobResult(report=None, out=out)
    with staged_output(out, overwrite=spec.overwrite) as tmp:
        comp = compress(adapters, spec.config, progress=progress)
        outputs = targets if spec.push else [str(out / n) for n in names]
        report = write_outputs(
            comp,
            tmp,
            names,
            outputs,
            spec.export,
            collection=spec.collection,
            command=spec.command,
            repo_ids=targets if spec.push else None,
            progress=export_progress,
        )
        if spec.verify or sets:
            from ..hub.pull import model_folder

            base_folder = model_folder(str(base), token=spec.token)
        if spec.verify:
            from ..evaluate.verify import verify_adapters

            log(f"verifying against {base}")
            from ..evaluate.replies import threads_for

            with tempfile.TemporaryDirectory(prefix="soppu-ranks-") as scratch, threads_for(base_folder):
                variants, sweep = _rank_variants(comp, names, spec, Path(scratch))
                checks = verify_adapters(
                    base_folder,
                    folders,
                    [tmp / n for n in names],
                    variants=variants,
                    prompts=probes,
                    progress=verify_progress,
                )
            for entry, v in zip(report.adapters, checks):
                entry.verify = v
            if sweep:
                report.rank_sweep = _sweep_summary(sweep, report, checks)
        if sets:
            from ..evaluate.task_eval import evaluate_adapters

            log(f"scoring the eval examples with {base}")
            from ..evaluate.replies import threads_for

            with threads_for(base_folder):
                scores = evaluate_adapters(
                    base_folder, folders, [tmp / n for n in names], sets, progress=score_progress
                )
            for entry, t in zip(report.adapters, scores):
                entry.task_eval = t
        if spec.verify or sets:
            (tmp / REPORT_NAME).write_text(report.to_json())
        _write_cards(tmp, report, names, targets, adapters, folders, spec, cards_progress)
        result.report = report
        if out is None:  # push straight from the temp folder
            result.pushed = push_outputs(tmp, names, targets, spec, log, push_progress)
    if out is not None and spec.push:
        result.pushed = push_outputs(out, names, targets, spec, log, push_progress)
    return result


def _write_cards(
    folder: Path,
    report: Report,
    names: list[str],
    targets: list[str],
    adapters,
    sources: list[Path],
    spec: JobSpec,
    progress: Progress | None = None,
) -> None:
    from ..cards.render import CardSpec
    from ..cards.write import source_license, write_cards

    jobs = [
        CardSpec(
            folder / name,
            i,
            target if spec.push else None,
            adapter.base_model,
            [adapter.source],
            spec.command,
            spec.config.weighting,
            None if spec.push else str(Path(spec.out).resolve() / name),
            source_license(src),
            spec.card_note,
        )
        for i, (name, target, adapter, src) in enumerate(zip(names, targets, adapters, sources))
    ]
    write_cards(jobs, report, workers=spec.workers, progress=progress)


def compress_folders(
    sources: list[str | Path],
    out: str | Path,
    config: CompressConfig,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Report:
    """Local-only shortcut: compress adapter folders into `out` without touching the Hub; returns the report."""
    spec = JobSpec(sources=[str(s) for s in sources], config=config, out=Path(out), push=False, overwrite=overwrite)
    return run_job(spec, progress=progress).report
