"""`make demo` end to end: its own Hub server, seeding, compress by repo id, rendered cards with plots."""

import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from lab.demo import run_demo
from lab.demo_sets import REAL_SETTING, REAL_STORE, setting_flags
from lab.screenshot import look_at_the_space

pytestmark = pytest.mark.e2e  # real servers over loopback


def test_the_example_replies_docs_show_are_what_the_real_demo_answers(tmp_path):
    """docs/demo.md's table of replies (written by `python -m lab demo --write-examples`), asked again of the real
    demo's backend: SmolLM2-135M-Instruct, the 24 real adapters compressed as `make demo` does, greedy."""
    from lab.demo_examples import EXAMPLES, ask, table, written

    asked = []
    run_demo(
        tmp_path / "demo",
        demo_set="real",
        log=lambda _: None,
        serve=False,
        background_checks=False,
        on_ready=lambda r: asked.extend(ask(r.backend_url)),
    )
    assert len(asked) == len(EXAMPLES) and all(r.compressed for r in asked)
    assert table(asked) == written(), table(asked)


def test_demo_runs_the_whole_chain(tmp_path):
    """The demo on the committed sample collection: 12 adapters, a real saving, and replies a person can read."""
    import json
    import os
    import time

    shots = Path(os.environ.get("SOPPU_TEST_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    logs, stamps, seen = [], [], {}
    start = time.monotonic()

    def log(line):
        logs.append(line)
        stamps.append(time.monotonic() - start)

    run = run_demo(
        tmp_path / "demo",
        demo_set="tiny",
        log=log,
        serve=False,
        on_ready=lambda r: seen.update(
            look_at_the_space(
                r.space_url, "alice/pirate-talk-soppu", "Where is my order? It has not arrived.", shots / "space.png"
            )
        ),
    )
    space_line = next(i for i, line in enumerate(logs) if line == f"the Space is running: open {run.space_url}")
    print(f"Space URL after {stamps[space_line]:.1f} s")  # reported, not asserted: timings belong in benchmarks
    # what the person saw: the pirate adapter, compressed, still talks like a pirate, as its original does
    assert seen["adapter"].startswith("Arr!") and seen["base"].startswith("Arr!"), seen
    assert (shots / "space.png").stat().st_size > 20_000
    report = json.loads((tmp_path / "demo" / "compressed" / "report.json").read_text())
    assert len(report["adapters"]) >= 12 and report["compression_ratio"] >= 2.4
    page = run.pages[0]
    html = page.read_text()
    assert "alice/support-bot-soppu" in html and "<table>" in html
    links = re.findall(r'<a [^>]*href="([^"]+)"', html)
    assert not [h for h in links if h.startswith("/")], links  # a repo link opened from disk leads to the demo's Hub
    assert any(h.startswith(f"{run.hub_url}/") for h in links), links
    images = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(images) == 3  # errors by layer, parameters, agreement against rank
    for src in images:
        png = page.parent / src
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith(f"card of alice/support-bot-soppu: {page} ") for line in logs), logs
    card = (tmp_path / "demo" / "compressed" / "support-bot" / "README.md").read_text()
    assert (
        "next-token agreement" in card
        and "reply agreement" in card
        and "\nlicense: apache-2.0\n" in card.split("\n---\n")[0]
    )
    pasted = next(line for line in logs if line.startswith("ready to paste")).splitlines()
    assert pasted[1].strip() == f".venv/bin/soppu-hub chat alice/support-bot-soppu --url {run.backend_url}"
    assert pasted[2].strip().startswith(f"curl -s {run.backend_url}/generate ")
    assert (
        pasted[3].strip().startswith(f"HF_ENDPOINT={run.hub_url} HF_TOKEN=hf_demo_alice .venv/bin/soppu-hub compress")
    )
    # everything the demo started is stopped again
    for url in (run.hub_url, run.backend_url, run.space_url):
        try:
            urllib.request.urlopen(url, timeout=2)
            raise AssertionError(f"{url} still answers")
        except OSError:
            pass


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    res = subprocess.run(
        [sys.executable, "-m", "lab", "demo", "--set", "tiny", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "was not made by the demo" in res.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep"


def _lines(proc, deadline):
    """stdout lines of `proc` until `deadline` (monotonic), read in a thread so a silent child cannot hang us."""
    import queue
    import threading
    import time

    q: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [q.put(line) for line in proc.stdout] + [q.put(None)], daemon=True).start()
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = q.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        yield line


@pytest.mark.parametrize("stop_signal", ["SIGINT", "SIGTERM"])
def test_make_demo_serves_until_ctrl_c_then_stops_everything(tmp_path, stop_signal):
    import signal
    import time

    from soppu_hub.launch import spawn_group, stop_group

    proc = spawn_group(
        [sys.executable, "-m", "lab", "demo", "--set", "tiny", "--workdir", str(tmp_path / "demo")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    urls = {}
    try:
        # a hang guard, not a timing: the tiny demo's verify-before-the-Space took over 240 s on 2 cores with two
        # CPU hogs beside the suite (the failure the reliability issue reported)
        for line in _lines(proc, time.monotonic() + 900):
            for key, marker in (("hub", "offline Hub running at "), ("backend", "backend at "), ("space", "open ")):
                if marker in line:
                    urls[key] = line.rsplit(marker, 1)[1].split()[0]
            if "Ctrl-C stops" in line:
                break
        assert set(urls) == {"hub", "backend", "space"}, urls
        with urllib.request.urlopen(urls["space"], timeout=10) as r:
            assert r.status == 200
        proc.send_signal(getattr(signal, stop_signal))
        assert proc.wait(300) == 0  # hub, backend and Space stopped in turn: over a minute on 2 loaded cores
    finally:
        stop_group(proc, grace=5.0)  # the demo's process group, and its children die with it
    for url in urls.values():
        try:
            urllib.request.urlopen(url, timeout=2)
            raise AssertionError(f"{url} still answers after Ctrl-C")
        except OSError:
            pass


def test_demo_on_a_real_style_set_checks_and_scores_in_the_background(tmp_path, tiny_base):
    """The real demo's path (a collection built by `collection build`, held-out examples, checks after the Space is
    up) on the tiny base: the Space first, then cards pushed again with agreement and held-out scores."""
    import dataclasses
    import time

    from huggingface_hub import hf_hub_download

    from lab.collection.build import build_task, read_manifest, write_manifest
    from lab.collection.tasks import BY_NAME
    from lab.demo_sets import real_set

    manifest = read_manifest(tmp_path / "collection")
    for name in ("shouty", "robot", "to-roman"):  # two families
        build_task(tmp_path / "collection", tiny_base, dataclasses.replace(BY_NAME[name], steps=2), manifest, log=print)
    write_manifest(tmp_path / "collection", manifest)
    demo_set = real_set(collection=tmp_path / "collection", base=tiny_base)
    assert [a.name for a in demo_set.adapters] == ["to-roman", "shouty", "robot"]  # the collection's task order
    assert demo_set.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and demo_set.checks_later
    assert demo_set.examples[1] == BY_NAME["shouty"].split()[1][0][0] and len(demo_set.probes) == 2
    cards = {}

    def after_checks(run):
        deadline = time.monotonic() + 300
        while run.checks.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        assert run.checks.returncode == 0, (tmp_path / "demo" / "checks.log").read_text()[-2000:]
        path = hf_hub_download(
            "alice/shouty-soppu",
            "README.md",
            token="hf_demo_alice",
            endpoint=run.hub_url,
            cache_dir=tmp_path / "hf-cache",
        )
        cards["hub"] = Path(path).read_text()

    logs = []
    run_demo(tmp_path / "demo", demo_set=demo_set, log=logs.append, serve=False, on_ready=after_checks)
    first = (tmp_path / "demo" / "compressed" / "shouty" / "README.md").read_text()
    assert "next-token agreement" not in first  # the Space came first: the fast pass has no checks
    assert "> Checks running:" in first  # and says they are coming
    assert "Checks running" not in cards["hub"]  # the checked card replaced it
    assert "in the background" in next(line for line in logs if line.startswith("checking every compressed"))
    command = next(line for line in logs if line.startswith("$ soppu-hub compress"))
    assert " ".join([*setting_flags(REAL_SETTING)]) in command and f"--store-dtype {REAL_STORE}" in command
    card = cards["hub"]
    assert "next-token agreement" in card and "On your 40 examples the compressed adapter" in card
    assert card == (tmp_path / "demo" / "checked" / "shouty" / "README.md").read_text()
    assert (tmp_path / "demo" / "held-out" / "shouty.jsonl").read_text() == (
        tmp_path / "collection" / "adapters" / "shouty" / "eval.jsonl"
    ).read_text()
