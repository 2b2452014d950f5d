"""`make demo`: the whole chain offline: a Hub seeded with a base and its adapters, compress by repo id, cards,
the backend and the Space; on the real model the checks and task scores follow in the background."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lab.demo_sets import SETS, DemoSet, chat_template, setting_flags
from lab.samples import TINY_BASE_ID, build_tiny_llama, write_sample_adapters
from soppu_hub.errors import SoppuError
from soppu_hub.hub.common import use_endpoint
from soppu_hub.hub.push import push_folder
from soppu_hub.progress import hub_bars_off

DEMO_USERS = {"alice": "hf_demo_alice", "soppu-samples": "hf_demo_samples", "HuggingFaceTB": "hf_demo_hftb"}


@dataclass
class Seeded:
    base_model: str
    adapters: list[str]  # repo ids


def seed_hub(
    endpoint: str,
    workdir: Path,
    *,
    user: str = "alice",
    user_token: str,
    base_token: str,
    demo_set: DemoSet | None = None,
) -> Seeded:
    """Publish a base model under its repo id and adapters naming it as their base (as <user>/<folder name>).

    From a DemoSet (the demo) or, without one, a random tiny Llama and two synthetic adapters written into
    `workdir` (the tests: fast, and shaped like the real thing). `base_token` owns the base id's namespace.
    """
    if demo_set is not None:
        base, base_id, adapters = demo_set.base_folder, demo_set.base_model, demo_set.adapters
    else:
        base, base_id = build_tiny_llama(workdir / "tiny-llama"), TINY_BASE_ID
        adapters = write_sample_adapters(workdir / "adapters", base_model=TINY_BASE_ID)
    ids = []
    # two dozen small uploads: per-file bars would be noise in the demo's terminal
    with hub_bars_off(), use_endpoint(endpoint):
        push_folder(base, base_id, token=base_token, commit_message=f"{base_id} for the demo")
        for folder in adapters:
            repo_id = f"{user}/{folder.name}"
            push_folder(folder, repo_id, token=user_token, commit_message="LoRA adapter")
            ids.append(repo_id)
    return Seeded(base_id, ids)


def prepare_workdir(workdir: Path) -> Path:
    """Empty the demo folder, refusing to touch a folder the demo did not make."""
    marker = workdir / ".soppu-demo"
    if workdir.exists() and any(workdir.iterdir()) and not marker.exists():
        raise SoppuError(f"{workdir} exists and was not made by the demo; pass another --workdir")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    marker.touch()
    return workdir


def demo_env(endpoint: str, token: str) -> dict[str, str]:
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_TOKEN=token, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1")
    env["HF_HOME"] = env.get("SOPPU_DEMO_HF_HOME", str(Path(env.get("TMPDIR", "/tmp")) / "soppu-demo-hf-home"))
    return env


@dataclass
class DemoRun:
    hub_url: str
    backend_url: str
    space_url: str
    pages: list[Path]
    checks: subprocess.Popen | None = None  # the background verify-and-score run (real model), if any


CHECKS_RUNNING = (
    "Checks running: agreement with the original and held-out task scores are being measured in the background; "
    "this card is replaced with them when they end."
)


def _compress_cmd(ids: list[str], demo_set: DemoSet, workdir: Path, out: str, *, checks: bool) -> list[str]:
    """`soppu-hub compress` of the seeded repos; with checks, --verify (and the set's probes and held-out
    examples), which rewrites the cards and pushes them again (the weights are the same: JD is deterministic)."""
    cmd = [
        sys.executable,
        "-m",
        "soppu_hub",
        "compress",
        *ids,
        *setting_flags(demo_set.setting),
        "--out",
        str(workdir / out),
    ]
    if len(ids) > 1:  # the bases once, in a collection repo; each member repo holds its export and its cores
        cmd += ["--collection", demo_collection(ids, demo_set)]
    if demo_set.store != "auto":
        cmd += ["--store-dtype", demo_set.store]
    if not checks:
        return cmd
    ranks = [r for r in demo_set.verify_ranks if r < demo_set.setting.get("rank", max(demo_set.verify_ranks) + 1)]
    cmd += ["--verify", "--verify-ranks", ",".join(str(r) for r in ranks)]
    if demo_set.probes:
        (workdir / "probes.txt").write_text("".join(p.replace("\n", " ") + "\n" for p in demo_set.probes))
        cmd += ["--probe-file", str(workdir / "probes.txt")]
    if demo_set.held_out:
        evals = workdir / "held-out"
        evals.mkdir(exist_ok=True)
        for name, path in demo_set.held_out.items():
            shutil.copyfile(path, evals / f"{name}.jsonl")
        cmd += ["--eval-file", str(evals)]
    return cmd


def demo_collection(ids: list[str], demo_set: DemoSet) -> str:
    """The collection repo the demo publishes its set's shared bases in, in the adapters' namespace."""
    return f"{ids[0].split('/')[0]}/{demo_set.name}-collection"


def _card_pages(ids: list[str], folder: Path, workdir: Path, hub_url: str) -> list[Path]:
    """Each compressed repo's card as the Hub page shows it, written beside the demo's files: its files by relative
    path, its links to other repos on the demo's Hub (opened from disk, "/alice/x" would be the disk's root)."""
    from soppu_hub.hubserver.page import render_card_page

    pages = []
    for repo_id in ids:
        name = repo_id.split("/")[1]
        files = sorted(p.relative_to(folder / name).as_posix() for p in (folder / name).rglob("*") if p.is_file())
        page = workdir / f"{name}-card.html"
        page.write_text(
            render_card_page(
                f"{repo_id}-soppu",
                (folder / name / "README.md").read_text(),
                files,
                f"{folder.name}/{name}/",
                site=hub_url,
            )
        )
        pages.append(page)
    return pages


def run_demo(
    workdir: Path,
    *,
    demo_set: str | DemoSet = "real",
    log: Callable[[str], None] = print,
    serve: bool = True,
    on_ready: Callable[[DemoRun], None] | None = None,
    background_checks: bool = True,
) -> DemoRun:
    """Offline Hub + a DemoSet (or its name in SETS) -> `soppu-hub compress` by repo id -> backend -> the Space.

    The tiny set is checked (--verify) before the Space starts; the real one after, in the background, because
    greedy replies and held-out scores of two dozen adapters on a 135M model take minutes of CPU: the Space is up
    first and the cards are pushed again, with agreement and task scores, when the checks end.
    With serve=True it blocks until Ctrl-C; either way everything it started is stopped at the end.
    on_ready(run) is called while everything is up (the tests drive a browser there). background_checks=False
    leaves out a real set's background checks (what asks only the backend, such as the example replies, needs none).
    """
    from jinja2 import Template

    from soppu_hub.launch import spawn_group, start_backend, start_hub, start_space, stop_group

    workdir = prepare_workdir(Path(workdir))
    children, checks = [], None
    try:
        if isinstance(demo_set, str):
            demo_set = SETS[demo_set](log)
        hub = start_hub(workdir / "hub-data", DEMO_USERS)
        children.append(hub)
        log(f"offline Hub running at {hub.url}")
        seeded = seed_hub(
            hub.url,
            workdir / "samples",
            user_token=DEMO_USERS["alice"],
            base_token=DEMO_USERS[demo_set.base_model.split("/")[0]],
            demo_set=demo_set,
        )
        log(f"seeded {seeded.base_model} and {len(seeded.adapters)} adapters ({', '.join(seeded.adapters)})")
        env = demo_env(hub.url, DEMO_USERS["alice"])
        cmd = _compress_cmd(seeded.adapters, demo_set, workdir, "compressed", checks=not demo_set.checks_later)
        if demo_set.checks_later:  # until the checked cards replace these
            cmd += ["--card-note", CHECKS_RUNNING]
        log("$ soppu-hub compress " + " ".join(cmd[4:]))
        # the backend loads the base model from the Hub meanwhile: it needs no compressed adapter to start
        backend = start_backend(seeded.base_model, env=env, wait=False)
        children.append(backend)
        subprocess.run(cmd, env=env, check=True)
        backend.wait_ready()
        log(f"embedded LoRAX-compatible backend at {backend.url}")
        pages = _card_pages(seeded.adapters, workdir / "compressed", workdir, hub.url)
        first = f"{seeded.adapters[0]}-soppu"
        log(f"card of {first}: {pages[0]} (and {hub.url}/{first}); {len(pages) - 1} more card pages beside it")
        (workdir / "examples.txt").write_text("".join(e + "\n" for e in demo_set.examples))
        space = start_space(
            dict(
                env,
                LORAX_URL=backend.url,
                SOPPU_AUTHOR="alice",
                SOPPU_COMPARE="original",
                SOPPU_EXAMPLES_FILE=str(workdir / "examples.txt"),
                SOPPU_ADAPTER=first,  # the page opens on the adapter the first example prompt is for
            )
        )
        children.append(space)
        log(f"the Space is running: open {space.url}")
        if demo_set.checks_later and background_checks:
            check_cmd = _compress_cmd(seeded.adapters, demo_set, workdir, "checked", checks=True)
            nice = ["nice", "-n", "10"] if shutil.which("nice") else []  # chat replies come first
            checks = spawn_group(
                [*nice, *check_cmd],  # piped: a line per tenth of each phase, with the time left
                env=env,
                stdout=open(workdir / "checks.log", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
            )
            log(
                f"checking every compressed adapter against its original and scoring both on its held-out examples, "
                f"in the background (minutes; log: {workdir / 'checks.log'}): the cards on the Hub get the figures "
                "when it ends"
            )
        prompt = Template(chat_template(demo_set.base_folder)).render(
            messages=[{"role": "user", "content": demo_set.examples[0]}], add_generation_prompt=True
        )
        body = json.dumps({"inputs": prompt, "parameters": {"adapter_id": first, "max_new_tokens": 32}})
        log(
            "ready to paste, while the demo runs:\n"
            f"  .venv/bin/soppu-hub chat {first} --url {backend.url}\n"
            f"  curl -s {backend.url}/generate -H 'Content-Type: application/json' -d {shlex.quote(body)}\n"
            f"  HF_ENDPOINT={hub.url} HF_TOKEN={DEMO_USERS['alice']} .venv/bin/soppu-hub compress {seeded.adapters[0]} "
            "--no-push --out my-copy   # the demo's own Hub and its demo-only token"
        )
        run = DemoRun(hub.url, backend.url, space.url, pages, checks)
        if on_ready:
            on_ready(run)
        if serve:
            log("Ctrl-C stops the Space, the backend and the Hub")
            _serve_until_stopped(space, checks, log)
        return run
    except KeyboardInterrupt:
        log("stopping")
        return None
    finally:
        if checks is not None:
            stop_group(checks, grace=10.0)  # time to remove its half-written folder
        for child in reversed(children):
            child.stop()


def _serve_until_stopped(space, checks: subprocess.Popen | None, log: Callable[[str], None]) -> None:
    """Wait on the Space; say once when the background checks end, and how."""
    import time

    while space.proc.poll() is None:
        if checks is not None and checks.poll() is not None:
            log(
                "the checks are done: the cards on the Hub now show agreement and held-out scores"
                if checks.returncode == 0
                else f"the checks failed (exit {checks.returncode}); see checks.log in the demo folder"
            )
            checks = None
        time.sleep(1.0)
