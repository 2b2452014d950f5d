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
PUSH_TITLE = "soppu-hub: JD-full rank 8"  # a member's commit message at these settings


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

            def push(api=api, folder=folder, round_=round_, done=done):
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


@pytest.mark.parametrize("kill_at", ["repo created", "collection committed", "members half pushed"])
def test_compress_killed_between_the_collections_commit_and_its_members_completes_on_a_rerun(
    hub_server, tmp_path, kill_at
):
    """`compress --collection` killed with SIGKILL as soon as the collection repo exists (before its first commit),
    or as soon as the collection's commit is on the Hub (its members not yet all pushed, their revisions not
    recorded). The same command again completes it: every member pushed and listed with its revision; what had
    landed before the kill gets no second commit, the collection no second publish."""
    import json
    import subprocess
    import sys

    from lab.samples import family_factors, llama_module_shapes, write_adapter

    child, top = hub_server
    tag = kill_at.split()[0]  # its own member repos per kill point
    facs, _ = family_factors(llama_module_shapes(hidden=64, layers=2), 16, 4, families=2, noise=0.02, seed=11)
    folders = [
        write_adapter(tmp_path / "in" / f"{tag}{i:02d}", f, base_model="tiny", rank=4, alpha=8)
        for i, f in enumerate(facs)
    ]
    coll, user = f"carol/killed-{tag}", "carol"  # not alice: the Space's tests list alice's repos
    flags = f"--rank 8 --collection {coll} --token {USERS[user]} --workers 2 --quiet".split()
    cmd = [sys.executable, "-m", "soppu_hub", "compress", *map(str, folders), *flags]
    repo = top / "root" / "repos" / "model" / coll

    def head_of(d):
        return json.loads((d / "commits" / f"{json.loads((d / 'refs.json').read_text())['main']}.json").read_text())

    def reached() -> bool:
        """The kill point, read from the Hub's disk: the repo exists / its head holds collection.json / 8 members
        have their push commit."""
        try:
            if kill_at == "members half pushed":
                homes = [top / "root" / "repos" / "model" / user / f"{tag}{i:02d}-soppu" for i in range(16)]
                return sum((d / "refs.json").is_file() and head_of(d)["message"] == PUSH_TITLE for d in homes) >= 8
            return kill_at == "repo created" or "collection.json" in head_of(repo)["files"]
        except (OSError, ValueError, KeyError):
            return False

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not reached() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert reached(), f"the run ended before {kill_at}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    api = HfApi(endpoint=child.url, token=USERS[user])
    members = [f"{user}/{tag}{i:02d}-soppu" for i in range(16)]

    def commits(repo_id: str) -> list:
        return api.list_repo_commits(repo_id) if api.repo_exists(repo_id) else []

    before = {r: [c.commit_id for c in commits(r)] for r in [coll, *members]}
    landed = [r for r in members if any(c.title == PUSH_TITLE for c in commits(r))]  # a created repo has not landed
    print(f"killed at {kill_at!r} with {len(landed)} of 16 members pushed")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    after = {r: [c.commit_id for c in commits(r)] for r in [coll, *members]}
    assert all(after[r] == before[r] for r in landed), "a member pushed before the kill was pushed again"
    pushes = {r: [c.title for c in api.list_repo_commits(r)].count(PUSH_TITLE) for r in members}
    assert pushes == dict.fromkeys(members, 1), pushes  # every member pushed exactly once over both runs
    titles = [c.title for c in api.list_repo_commits(coll)]
    assert titles.count("soppu-hub: publish collection") == 1  # published once, not again
    if kill_at == "collection committed":
        assert before[coll][0] in after[coll]  # the publish before the kill is the one that stands
    listed = json.loads(
        "".join(
            open(api.hf_hub_download(coll, f"clusters/members-{c}.json")).read()
            for c in range(1)  # one cluster at rank 8 for this set
        )
    )["members"]
    assert sorted(m["repo_id"] for m in listed) == members
    assert all(m["revision"] == after[m["repo_id"]][0] for m in listed)  # each member's revision recorded


def test_a_backend_killed_under_32_streams_is_one_line_in_the_space_which_recovers_when_it_is_back(
    hub, pushed, tmp_path
):
    """32 chats through the Space's `chat` API at once, the backend killed with SIGKILL while they stream: every
    chat ends, a cut one with what it had plus one line saying the backend is gone (no traceback, no class name);
    the backend restarted on its port, the Space answers again without a restart of its own."""
    from concurrent.futures import ThreadPoolExecutor, wait

    from gradio_client import Client

    from soppu_hub.launch import free_port, start_backend, start_space

    port = free_port()
    extra = ["--max-total-tokens", "512"]
    backend = start_backend(hub.base_model, port=port, extra=extra)
    space = start_space(dict(os.environ, LORAX_URL=backend.url, SOPPU_AUTHOR="alice", SOPPU_MAX_NEW_TOKENS="400"))
    try:
        client = Client(space.url, verbose=False)
        started = threading.Event()

        def chat(i: int) -> str:
            job = client.submit(
                f"Tell me a long story, number {i}.", [], "alice/support-bot-soppu", "", 0.7, 400, api_name="/chat"
            )
            for _ in job:
                started.set()
            return job.result()

        pool = ThreadPoolExecutor(32)
        futures = [pool.submit(chat, i) for i in range(32)]
        assert started.wait(120), "no chat started streaming"
        _kill9(backend)
        done, hung = wait(futures, timeout=300)  # a hang guard: a chat that never ends is a failure, not a hang
        pool.shutdown(wait=False, cancel_futures=True)
        assert not hung, f"{len(hung)} of 32 chats never ended after the backend was killed"
        replies = [f.result() for f in futures]
        cut = [r for r in replies if "⚠️" in r]
        assert cut, "every chat finished before the kill: nothing was cut"
        for r in cut:
            last = r.strip().splitlines()[-1]
            assert r.count("⚠️") == 1 and last.startswith("⚠️") and "backend" in last, r
            assert "Traceback" not in r and "Error" not in r, r
        backend = start_backend(hub.base_model, port=port, extra=extra)
        again = client.submit("Hello!", [], "alice/support-bot-soppu", api_name="/chat").result()
        assert again and "⚠️" not in again, again
        print(f"{len(cut)} of 32 chats cut by the kill; their last line: {cut[0].strip().splitlines()[-1]!r}")
    finally:
        space.stop()
        backend.stop()
