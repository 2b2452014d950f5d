"""Child servers never outlive what started them: killed parent, stopped process group."""

import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.e2e

PARENT = """
import sys, time
from soppu_hub.launch import start_hub
child = start_hub(sys.argv[1], {"alice": "hf_test_alice"})
print(child.url, child.proc.pid, flush=True)
time.sleep(600)
"""


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_a_server_dies_with_its_killed_parent(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "hub")], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()  # start_hub returns within its own 60 s deadline or raises
        url, pid = line.split()
        assert _answers(url)
        parent.kill()  # SIGKILL: no finally, no atexit in the parent
        parent.wait(10)
        deadline = time.monotonic() + 20
        while _answers(url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _answers(url), "the Hub outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
