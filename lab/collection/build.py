"""Build the real collection adapter by adapter (`python -m lab collection build`): train, score, card, manifest.

Resumable: an adapter whose folder is complete (weights, config, card, eval.jsonl, and its manifest entry) is
kept, so an interrupted build goes on where it stopped and finished adapters can be committed as they come.
Each adapter is written to a scratch folder and moved into place whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lab.collection.tasks import BY_NAME, HELD_OUT, TASKS, Task
from lab.collection.train import BATCH, train_task
from lab.realbase import REAL_BASE_ID
from soppu_hub.cards.render import table_cell
from soppu_hub.errors import ConfigError
from soppu_hub.evaluate.replies import greedy_replies
from soppu_hub.evaluate.task_eval import score

COLLECTION = Path(__file__).parent / "data"
MANIFEST, EVAL_FILE = "manifest.json", "eval.jsonl"
SEED, EXAMPLES = 42, 4


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    return (
        json.loads(path.read_text())
        if path.is_file()
        else {"base_model": REAL_BASE_ID, "adapters": {}, "base_scores": {}}
    )


def write_manifest(folder: Path, manifest: dict, task: str | None = None) -> None:
    """The manifest written whole, or (task) only that task's entries merged into the one on disk now, so builds of
    different tasks running side by side (`--only pirate` and `--only robot`) keep each other's records."""
    if task is not None:
        on_disk = read_manifest(folder)
        for key in ("adapters", "base_scores"):
            if task in manifest[key]:
                on_disk[key][task] = manifest[key][task]
        manifest = on_disk
    tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    tmp.replace(folder / MANIFEST)


def _done(folder: Path, manifest: dict, name: str) -> bool:
    entry = manifest["adapters"].get(name)
    return bool(entry) and all(
        (folder / "adapters" / name / f).is_file() and _sha256(folder / "adapters" / name / f) == h
        for f, h in entry["files"].items()
    )


def _render(**values) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    from lab import CARDS

    env = Environment(loader=FileSystemLoader(str(CARDS)), undefined=StrictUndefined, keep_trailing_newline=True)
    return env.get_template("collection-adapter.md").render(**values)


def _evaluate(base_folder: Path, adapter: Path | None, held_out: list) -> tuple[dict, list[str]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_folder))
    model = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    longest = max(len(tok(a, add_special_tokens=False).input_ids) for _, a in held_out)
    replies = greedy_replies(model, tok, [p for p, _ in held_out], max_new_tokens=longest + 8)
    return score(replies, [a for _, a in held_out]), replies


def _held_out_digest(held_out: list) -> str:
    return hashlib.sha256(json.dumps(held_out, ensure_ascii=False).encode()).hexdigest()[:16]


def _base_score(base_folder: Path, task: Task, held_out: list, manifest: dict) -> dict:
    """The base model's score on this held-out split: kept in the manifest with the split's digest, computed again
    when the split changed (a task whose examples were redone)."""
    digest = _held_out_digest(held_out)
    kept = manifest["base_scores"].get(task.name)
    if not kept or kept.get("held_out_digest") != digest:
        scored, _ = _evaluate(base_folder, None, held_out)
        manifest["base_scores"][task.name] = {**scored, "held_out_digest": digest}
    return manifest["base_scores"][task.name]


def _score_and_card(
    folder: Path,
    base_folder: Path,
    task: Task,
    manifest: dict,
    *,
    train: list,
    held_out: list,
    loss: float,
    seconds: float,
) -> dict:
    """Score the base and the adapter in `folder` on the held-out split; write eval.jsonl and the card there."""
    base = _base_score(base_folder, task, held_out, manifest)
    adapter_score, replies = _evaluate(base_folder, folder, held_out)
    (folder / EVAL_FILE).write_text(
        "".join(json.dumps({"prompt": p, "answer": a}, ensure_ascii=False) + "\n" for p, a in held_out)
    )
    examples = [(table_cell(p), table_cell(a), table_cell(r)) for (p, a), r in list(zip(held_out, replies))[:EXAMPLES]]
    (folder / "README.md").write_text(
        _render(
            task=task,
            base_model=REAL_BASE_ID,
            n_tasks=len(TASKS),
            held_out=len(held_out),
            train=len(train),
            base=base,
            adapter=adapter_score,
            examples=examples,
            batch=BATCH,
            seed=SEED,
            loss=loss,
            seconds=seconds,
        )
    )
    return adapter_score


def _record(folder: Path, task: Task, manifest: dict, adapter_score: dict, loss: float, seconds: float) -> None:
    final = folder / "adapters" / task.name
    manifest["adapters"][task.name] = {
        "family": task.family,
        "rank": task.rank,
        "targets": list(task.targets),
        "rslora": task.rslora,
        "dtype": task.dtype,
        "steps": task.steps,
        "final_loss": round(loss, 4),
        "seconds": round(seconds, 1),
        "held_out": adapter_score,
        "files": {p.name: _sha256(p) for p in sorted(final.iterdir()) if p.is_file()},
    }


def build_task(folder: Path, base_folder: Path, task: Task, manifest: dict, *, log: Callable[[str], None]) -> None:
    """Train, score (base and adapter on the held-out split), card and record one adapter."""
    train, held_out = task.split()
    scratch = folder / "adapters" / f".{task.name}.building"
    shutil.rmtree(scratch, ignore_errors=True)
    started = time.perf_counter()
    try:
        loss = train_task(base_folder, task, train, scratch, base_model=REAL_BASE_ID, seed=SEED)
        seconds = time.perf_counter() - started
        adapter_score = _score_and_card(
            scratch, base_folder, task, manifest, train=train, held_out=held_out, loss=loss, seconds=seconds
        )
        final = folder / "adapters" / task.name
        shutil.rmtree(final, ignore_errors=True)
        scratch.rename(final)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    _record(folder, task, manifest, adapter_score, loss, seconds)
    log(
        f"{task.name}: held-out exact match {adapter_score['exact_match']:.3f} (base "
        f"{manifest['base_scores'][task.name]['exact_match']:.3f}), chrF {adapter_score['chrf']:.3f}, {seconds:.0f} s"
    )


def rescore_task(folder: Path, base_folder: Path, task: Task, manifest: dict, *, log: Callable[[str], None]) -> None:
    """Score a trained adapter again (and the base, where its split changed), card and record it: no training."""
    entry = manifest["adapters"][task.name]
    train, held_out = task.split()
    loss, seconds = entry["final_loss"], entry["seconds"]
    adapter_score = _score_and_card(
        folder / "adapters" / task.name,
        base_folder,
        task,
        manifest,
        train=train,
        held_out=held_out,
        loss=loss,
        seconds=seconds,
    )
    _record(folder, task, manifest, adapter_score, loss, seconds)
    log(f"{task.name}: rescored, held-out exact match {adapter_score['exact_match']:.3f}")


def build_collection(
    folder: str | Path = COLLECTION,
    base_folder: str | Path | None = None,
    *,
    only: list[str] | None = None,
    threads: int = 2,
    rescore: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Every task's adapter not built yet (or only the named ones), in order; rescore: score the built ones again
    instead (no training). Returns the manifest."""
    from lab.realbase import real_base

    unknown = sorted(set(only or []) - set(BY_NAME))
    if unknown:
        raise ConfigError(f"unknown task {unknown[0]!r}; the tasks are {', '.join(BY_NAME)}")
    folder = Path(folder)
    (folder / "adapters").mkdir(parents=True, exist_ok=True)
    base_folder = Path(base_folder) if base_folder else real_base()
    manifest = read_manifest(folder)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for task in TASKS:
            if rescore:
                if task.name in manifest["adapters"] and (not only or task.name in only):
                    rescore_task(folder, base_folder, task, manifest, log=log)
                    write_manifest(folder, manifest, task.name)
                continue
            if (only and task.name not in only) or (not only and _done(folder, manifest, task.name)):
                continue
            build_task(folder, base_folder, task, manifest, log=log)
            write_manifest(folder, manifest, task.name)
    finally:
        torch.set_num_threads(saved)
    return manifest


def format_collection(manifest: dict) -> str:
    """The trained adapters in task order, each beside the base model on its held-out split (a Markdown table)."""
    out = [
        "| adapter | family | LoRA | steps | base EM / chrF | adapter EM / chrF | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        a = manifest["adapters"].get(task.name)
        if a is None:
            continue
        b, h = manifest["base_scores"][task.name], a["held_out"]
        targets = "/".join(t.removesuffix("_proj") for t in a["targets"])
        lora = f"r{a['rank']} {targets}{' rsLoRA' if a['rslora'] else ''}, {a['dtype']}"
        out.append(
            f"| {task.name} | {a['family']} | {lora} | {a['steps']} | {b['exact_match']:.3f} / {b['chrf']:.3f} | "
            f"{h['exact_match']:.3f} / {h['chrf']:.3f} | {a['seconds']:.0f} |"
        )
    out.append(f"\n{len(manifest['adapters'])} of {len(TASKS)} adapters trained; {HELD_OUT} held-out examples each.")
    return "\n".join(out)
