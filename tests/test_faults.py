"""Faults: processes killed with SIGKILL in the middle of their work, then what survived is checked.

Jepsen-style, on this machine's real processes: the offline Hub killed mid-commit, `compress --collection` killed
between the collection's commit and its members', the backend killed under 32 streams. Each test says where it
kills and what must hold afterwards.
"""

import hashlib
import os
import random
import signal
import threading
import time

import pytest
from conftest import USERS
from huggingface_hub import HfApi

pytestmark = pytest.mark.e2e  # real servers over loopback, killed


def _kill9(child) -> None:
    os.killpg(child.proc.pid, signal.SIGKILL)
    child.proc.wait(timeout=30)


def _consistent(root, repo_type: str, repo_id: str) -> tuple[str, dict]:
    """(head, files) read from the Hub's disk: every file the head names is stored with the content it names."""
    import json

    d = root / "repos" / repo_type / repo_id
    head = json.loads((d / "refs.json").read_text())["main"]
    files = json.loads((d / "commits" / f"{head}.json").read_text())["files"]
    for path, entry in files.items():
        blob = root / "objects" / entry["sha256"][:2] / entry["sha256"]
        assert blob.is_file() and hashlib.sha256(blob.read_bytes()).hexdigest() == entry["sha256"], path
    return head, files


def test_a_hub_killed_mid_commit_leaves_every_repo_at_its_old_or_new_revision(tmp_path):
    """Eight times: a 3 MB LFS commit in flight, the Hub killed with SIGKILL at a random moment of it, restarted on
    the same data. The repo is at the revision before or the one with every new file, never between; every file
    of its head is stored whole; the same commit, retried, lands."""
    from soppu_hub.hub.common import use_endpoint
    from soppu_hub.launch import free_port, start_hub

    root, users, repo, port = tmp_path / "hub", {"alice": USERS["alice"]}, "alice/killed", free_port()
    hub = start_hub(root, users, port=port)  # restarted on the same port: the same URL for the client
    endpoint = use_endpoint(hub.url)
    endpoint.__enter__()
    api = HfApi(endpoint=hub.url, token=USERS["alice"])
    api.create_repo(repo)
    api.upload_file(path_or_fileobj=b"v0\n", path_in_repo="v.txt", repo_id=repo, commit_message="v0")
    rng = random.Random(7)
    outcomes = []
    try:
        for round_ in range(1, 9):
            before, _ = _consistent(root, "model", repo)
            folder = tmp_path / f"c{round_}"
            folder.mkdir()
            (folder / "weights.safetensors").write_bytes(os.urandom(3_000_000))
            (folder / "v.txt").write_text(f"v{round_}\n")
            done = threading.Event()

            def push(api=api, folder=folder, round_=round_):
                try:
                    api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message=f"v{round_}")
                except Exception:  # noqa: BLE001 - the Hub was killed under it: expected
                    pass
                finally:
                    done.set()

            threading.Thread(target=push, daemon=True).start()
            time.sleep(rng.uniform(0.0, 0.25))
            _kill9(hub)
            done.wait(60)
            head, files = _consistent(root, "model", repo)
            if head == before:
                outcomes.append("old")
            else:
                assert files["v.txt"]["sha256"] == hashlib.sha256(f"v{round_}\n".encode()).hexdigest()
                assert "weights.safetensors" in files
                outcomes.append("new")
            hub = start_hub(root, users, port=port)
            api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message=f"v{round_} again")
            assert api.list_repo_commits(repo)[0].title in (f"v{round_} again", f"v{round_}")  # landed (or had)
            head, files = _consistent(root, "model", repo)
            assert files["v.txt"]["sha256"] == hashlib.sha256(f"v{round_}\n".encode()).hexdigest()
    finally:
        hub.stop()
        endpoint.__exit__(None, None, None)
    print("killed mid-commit, found at:", outcomes)  # which side of the commit each kill fell on
