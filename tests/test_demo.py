"""`make demo` end to end: its own Hub server, seeding, compress by repo id, rendered cards with plots."""

import re
import subprocess
import sys
import urllib.request

import pytest

from soppu_hub.demo import run_demo

pytestmark = pytest.mark.e2e  # real servers over loopback


def test_demo_runs_the_whole_chain(tmp_path):
    logs = []
    run = run_demo(tmp_path / "demo", log=logs.append, serve=False)
    page = run.pages[0]
    html = page.read_text()
    assert "alice/support-bot-soppu" in html and "<table>" in html
    images = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(images) == 2
    for src in images:
        png = page.parent / src
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith(f"card of alice/support-bot-soppu: {page} ") for line in logs), logs
    assert "next-token agreement" in (tmp_path / "demo" / "compressed" / "support-bot" / "README.md").read_text()
    assert any(line == f"the Space is running: open {run.space_url}" for line in logs)
    pasted = next(line for line in logs if line.startswith("ready to paste")).splitlines()
    assert pasted[1].strip() == f".venv/bin/soppu-hub chat alice/support-bot-soppu --url {run.backend_url}"
    assert pasted[2].strip().startswith(f"curl -s {run.backend_url}/generate ")
    assert pasted[3].strip().startswith(f"HF_ENDPOINT={run.hub_url} HF_TOKEN=hf_demo_alice .venv/bin/soppu-hub compress")
    # everything the demo started is stopped again
    for url in (run.hub_url, run.backend_url, run.space_url):
        try:
            urllib.request.urlopen(url, timeout=2)
            raise AssertionError(f"{url} still answers")
        except OSError:
            pass


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    res = subprocess.run([sys.executable, "-m", "soppu_hub", "demo", "--workdir", str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
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

    proc = spawn_group([sys.executable, "-m", "soppu_hub", "demo", "--workdir", str(tmp_path / "demo")],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    urls = {}
    try:
        for line in _lines(proc, time.monotonic() + 240):
            for key, marker in (("hub", "offline Hub running at "), ("backend", "backend at "), ("space", "open ")):
                if marker in line:
                    urls[key] = line.rsplit(marker, 1)[1].split()[0]
            if "Ctrl-C stops" in line:
                break
        assert set(urls) == {"hub", "backend", "space"}, urls
        with urllib.request.urlopen(urls["space"], timeout=10) as r:
            assert r.status == 200
        proc.send_signal(getattr(signal, stop_signal))
        assert proc.wait(60) == 0
    finally:
        stop_group(proc, grace=5.0)  # the demo's process group, and its children die with it
    for url in urls.values():
        try:
            urllib.request.urlopen(url, timeout=2)
            raise AssertionError(f"{url} still answers after Ctrl-C")
        except OSError:
            pass
