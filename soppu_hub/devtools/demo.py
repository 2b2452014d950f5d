"""`make demo`: the whole chain offline: a Hub server seeded with sample adapters, compress by repo id, cards."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import SoppuError
from ..hub.common import use_endpoint
from ..hub.push import push_folder
from .samples import CHAT_TEMPLATE, TINY_BASE_ID, build_tiny_llama, write_sample_adapters
from .samples.collection import COLLECTION, Collection, build_collection, load_collection

DEMO_RANK = 32  # chosen from `soppu-hub bench samples` (README, "The demo"): agreement against rank
DEMO_VERIFY_RANKS = (8, 16, 24)  # the cards plot agreement at these cuts of the same fit too
DEMO_USERS = {"alice": "hf_demo_alice", "soppu-samples": "hf_demo_samples"}


@dataclass
class Seeded:
    base_model: str
    adapters: list[str]  # repo ids


def seed_hub(endpoint: str, workdir: Path, *, user: str = "alice", user_token: str, samples_token: str,
             collection: Collection | None = None) -> Seeded:
    """Publish a base model and its sample adapters (naming it as their base) to a Hub endpoint.

    From the trained sample collection (the demo) or, without one, a random tiny Llama and two synthetic
    adapters written into `workdir` (the tests: fast, and shaped like the real thing).
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if collection is not None:
        base, adapters = collection.base, collection.adapters
    else:
        base = build_tiny_llama(workdir / "tiny-llama")
        adapters = write_sample_adapters(workdir / "adapters", base_model=TINY_BASE_ID)
    ids = []
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # thirteen small uploads: per-file bars would be noise in the demo's terminal
    try:
        with use_endpoint(endpoint):
            push_folder(base, TINY_BASE_ID, token=samples_token, commit_message="tiny Llama for the demo")
            for folder in adapters:
                repo_id = f"{user}/{folder.name}"
                push_folder(folder, repo_id, token=user_token, commit_message="sample LoRA adapter")
                ids.append(repo_id)
    finally:
        if not quiet:
            enable_progress_bars()
    return Seeded(TINY_BASE_ID, ids)


def sample_collection(log: Callable[[str], None] = print) -> Collection:
    """The committed collection; trained first (minutes, with a progress bar) when it is missing."""
    if (COLLECTION / "manifest.json").exists():
        return load_collection(COLLECTION)
    from ..progress import ProgressBar

    log(f"no sample collection in {COLLECTION}: training it once on the CPU (make samples does the same)")
    bar = ProgressBar("training", "step")
    try:
        return build_collection(COLLECTION, progress=bar, log=log)
    finally:
        bar.close()


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


def run_demo(workdir: Path, *, log: Callable[[str], None] = print, rank: int = DEMO_RANK, serve: bool = True,
             on_ready: Callable[[DemoRun], None] | None = None) -> DemoRun:
    """Offline Hub + samples -> `soppu-hub compress` by repo id -> embedded backend -> the Space.

    With serve=True it blocks until Ctrl-C; either way everything it started is stopped at the end.
    on_ready(run) is called while everything is up (the tests drive a browser there).
    """
    from jinja2 import Template

    from ..hubserver.page import render_card_page
    from .launch import start_backend, start_hub, start_space

    workdir = prepare_workdir(Path(workdir))
    children = []
    try:
        hub = start_hub(workdir / "hub-data", DEMO_USERS)
        children.append(hub)
        log(f"offline Hub running at {hub.url}")
        collection = sample_collection(log)
        seeded = seed_hub(hub.url, workdir / "samples", user_token=DEMO_USERS["alice"],
                          samples_token=DEMO_USERS["soppu-samples"], collection=collection)
        log(f"seeded {seeded.base_model} and {len(seeded.adapters)} sample adapters ({', '.join(seeded.adapters)})")
        env = demo_env(hub.url, DEMO_USERS["alice"])
        cmd = [sys.executable, "-m", "soppu_hub", "compress", *seeded.adapters, "--rank", str(rank), "--verify",
               "--verify-ranks", ",".join(str(r) for r in DEMO_VERIFY_RANKS if r < rank), "--out", str(workdir / "compressed")]
        log("$ soppu-hub compress " + " ".join(cmd[4:]))
        # the backend loads the base model from the Hub meanwhile: it needs no compressed adapter to start
        backend = start_backend(seeded.base_model, env=env, wait=False)
        children.append(backend)
        subprocess.run(cmd, env=env, check=True)
        backend.wait_ready()
        log(f"embedded LoRAX-compatible backend at {backend.url}")
        pages = []
        for repo_id in seeded.adapters:
            name = repo_id.split("/")[1]
            target = f"alice/{name}-soppu"
            folder = workdir / "compressed" / name
            files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            page = workdir / f"{name}-card.html"
            page.write_text(render_card_page(target, (folder / "README.md").read_text(), files, f"compressed/{name}/"))
            pages.append(page)
        first_card = f"alice/{seeded.adapters[0].split('/')[1]}-soppu"
        log(f"card of {first_card}: {pages[0]} (and {hub.url}/{first_card}); "
            f"{len(pages) - 1} more card pages beside it")
        space = start_space(dict(env, LORAX_URL=backend.url, SOPPU_AUTHOR="alice"))
        children.append(space)
        log(f"the Space is running: open {space.url}")
        first = first_card
        prompt = Template(CHAT_TEMPLATE).render(messages=[{"role": "user", "content": "Hello!"}], add_generation_prompt=True)
        body = json.dumps({"inputs": prompt, "parameters": {"adapter_id": first, "max_new_tokens": 32}})
        log("ready to paste, while the demo runs:\n"
            f"  .venv/bin/soppu-hub chat {first} --url {backend.url}\n"
            f"  curl -s {backend.url}/generate -H 'Content-Type: application/json' -d {shlex.quote(body)}\n"
            f"  HF_ENDPOINT={hub.url} HF_TOKEN={DEMO_USERS['alice']} .venv/bin/soppu-hub compress {seeded.adapters[0]} "
            "--no-push --out my-copy   # the demo's own Hub and its demo-only token")
        run = DemoRun(hub.url, backend.url, space.url, pages)
        if on_ready:
            on_ready(run)
        if serve:
            log("Ctrl-C stops the Space, the backend and the Hub")
            space.proc.wait()
        return run
    except KeyboardInterrupt:
        log("stopping")
        return None
    finally:
        for child in reversed(children):
            child.stop()
