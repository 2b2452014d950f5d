"""Reliability matrix, Hub rows: hostile and broken clients against the session's offline Hub (a real process).

Each test says what it sends; each checks the answer (a 4xx with a message, never a 500) and that nothing was
lost or written: the repo's history and files are unchanged and nothing appears outside the Hub's root.
"""

import base64
import hashlib
import http.client
import json
import os
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import USERS
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

pytestmark = pytest.mark.e2e  # a real Hub server over loopback

WRONG = "hf_rel_wrong_5555555555"
REPO = "alice/notes"
SECRET = "alice/secret-notes"


@pytest.fixture(scope="module")
def relhub(hub_server):
    """The session's Hub (its log and disk are searched for tokens at the end), with a public and a private repo."""
    child, top = hub_server
    api = HfApi(endpoint=child.url, token=USERS["alice"])
    for repo_id, private, path, data in [(REPO, False, "a.txt", b"first\n"), (SECRET, True, "s.txt", b"hidden\n")]:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_file(path_or_fileobj=data, path_in_repo=path, repo_id=repo_id)
    return child, top


def raw(
    url: str, method: str, path: str, body: bytes | None = None, token: str | None = None, headers: dict | None = None
) -> tuple[int, dict, bytes]:
    """One request with the path sent exactly as given (no client-side normalisation or quoting)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=h)
    r = conn.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    conn.close()
    return out


def state(url: str, repo_id: str = REPO) -> tuple[list[str], dict[str, str]]:
    """(commit ids newest first, path -> blob id) as alice sees them."""
    api = HfApi(endpoint=url, token=USERS["alice"])
    commits = [c.commit_id for c in api.list_repo_commits(repo_id)]
    files = {f.path: f.blob_id for f in api.list_repo_tree(repo_id, recursive=True) if hasattr(f, "blob_id")}
    return commits, files


def ndjson(*items: dict) -> bytes:
    return b"\n".join(json.dumps(i).encode() for i in items)


def header(summary: str = "x") -> dict:
    return {"key": "header", "value": {"summary": summary}}


def add(path: str, content: bytes = b"evil\n") -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(content).decode(), "encoding": "base64"}}


def outside_root(top: Path) -> list[str]:
    return sorted(p.name for p in top.iterdir() if p.name not in ("root", "hub.log"))


def test_writes_need_a_token_that_may_write_there(relhub):
    child, _ = relhub
    url, before = child.url, state(child.url)
    commit = ndjson(header(), add("b.txt"))
    for token, expected in [(None, 401), (WRONG, 401), (USERS["bob"], 403)]:
        assert raw(url, "POST", f"/api/models/{REPO}/commit/main", commit, token)[0] == expected
        assert raw(url, "POST", f"/api/models/{REPO}/preupload/main", b'{"files": []}', token)[0] == expected
        assert raw(url, "POST", f"/{REPO}.git/info/lfs/objects/batch", b'{"objects": []}', token)[0] == expected
    for token, body, expected in [
        (None, {"name": "x"}, 401),
        (WRONG, {"name": "x"}, 401),
        (USERS["bob"], {"name": "x", "organization": "alice"}, 403),
        (USERS["bob"], {"name": "x", "organization": "acme"}, 403),
    ]:
        status, _, text = raw(url, "POST", "/api/repos/create", json.dumps(body).encode(), token)
        assert status == expected, text
    assert state(url) == before
    assert HfApi(endpoint=url, token=USERS["alice"]).create_repo("acme/shared", exist_ok=True).repo_id == "acme/shared"


def test_private_repos_are_invisible_to_others(relhub):
    child, _ = relhub
    url = child.url
    for token, expected in [(None, 401), (WRONG, 401), (USERS["bob"], 404)]:
        assert raw(url, "GET", f"/api/models/{SECRET}", token=token)[0] == expected
        status, h, body = raw(url, "GET", f"/{SECRET}/resolve/main/s.txt", token=token)
        assert status == expected and b"hidden" not in body and h.get("x-error-code") == "RepoNotFound"
        assert raw(url, "GET", f"/api/models/{SECRET}/tree/main", token=token)[0] == expected
        listed = json.loads(raw(url, "GET", "/api/models?author=alice", token=token)[2])
        assert listed and SECRET not in [m["id"] for m in listed]
    assert raw(url, "GET", f"/{SECRET}/resolve/main/s.txt", token=USERS["alice"])[2] == b"hidden\n"


def test_the_front_page_lists_the_repos_each_caller_may_see(relhub):
    """The Hub's root is a page for a person: every model repo the caller may see, linked; private ones only to
    their owner; never a bare {"detail": "Not Found"}."""
    child, _ = relhub
    for token, shows_secret in [(None, False), (USERS["bob"], False), (USERS["alice"], True)]:
        status, h, body = raw(child.url, "GET", "/", token=token)
        page = body.decode()
        assert status == 200 and h.get("content-type", "").startswith("text/html")
        assert f'<a href="/{REPO}">{REPO}</a>' in page and "HF_ENDPOINT=" in page
        assert (SECRET in page) == shows_secret


TRAVERSAL_PATHS = [
    "../escape.txt",
    "a/../../escape2.txt",
    "..%2fescape3.txt",
    "a/./../../../escape4.txt",
    "/etc/passwd",
    "a//b.txt",
    "a\\..\\..\\escape5.txt",
    "%2e%2e/escape6.txt",
    ".git/config",
    "nul\x00byte.txt",
    "./dot.txt",
]


@pytest.mark.parametrize("path", TRAVERSAL_PATHS)
def test_commit_paths_that_climb_out_are_refused(relhub, path):
    child, top = relhub
    before = state(child.url)
    status, h, body = raw(
        child.url, "POST", f"/api/models/{REPO}/commit/main", ndjson(header(), add(path)), USERS["alice"]
    )
    assert status == 400 and "invalid file path" in json.loads(body)["error"], body
    assert state(child.url) == before and outside_root(top) == []
    for p in ("deletedFile", "deletedFolder"):
        item = {"key": p, "value": {"path": path}}
        assert (
            raw(child.url, "POST", f"/api/models/{REPO}/commit/main", ndjson(header(), item), USERS["alice"])[0] == 400
        )
    assert state(child.url) == before


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/api/models/alice/..%2F..%2Fobjects"),
        ("GET", "/api/models/%2e%2e/notes"),
        ("GET", "/api/models/alice/.."),
        ("GET", "/alice/..%2fnotes/resolve/main/a.txt"),
        ("GET", "/api/models/alice/notes/revision/..%2F..%2Frefs.json"),
        ("GET", "/api/models/alice/notes/revision/../main"),
        ("GET", "/alice/notes/resolve/..%2f..%2fx/a.txt"),
        ("GET", "/alice/notes/resolve/main/..%2f..%2frepo.json"),
        ("GET", "/alice/notes/resolve/main/%2e%2e/%2e%2e/repo.json"),
        ("GET", "/api/models/alice/notes/tree/main/..%2f.."),
        ("GET", "/api/models/alice/notes/commits/..%2f..%2fmain"),
        ("POST", "/api/models/alice/notes/commit/..%2f..%2fmain"),
        ("POST", "/api/models/alice/notes/commit/a%2f..%2f..%2fb"),
    ],
)
def test_repo_names_and_revisions_that_climb_out_are_refused(relhub, method, path):
    child, top = relhub
    before = state(child.url)
    body = ndjson(header(), add("ok.txt")) if method == "POST" else None
    status, _, text = raw(child.url, method, path, body, USERS["alice"])
    assert status in (400, 404), (status, text)
    assert b"hidden" not in text and b"private" not in text and b'"main"' not in text  # nothing of the store leaks
    assert state(child.url) == before and outside_root(top) == []


@pytest.mark.parametrize("name", ["../escape", "..", "a/b", "%2e%2e", ".hidden", "x" * 200, "", "a b", "a\x00b"])
def test_repo_names_that_are_not_names_are_refused(relhub, name):
    child, top = relhub
    repos_before = sorted((top / "root" / "repos").rglob("*"))
    status, _, text = raw(child.url, "POST", "/api/repos/create", json.dumps({"name": name}).encode(), USERS["alice"])
    assert status == 400, text
    assert outside_root(top) == [] and sorted((top / "root" / "repos").rglob("*")) == repos_before


MALFORMED_COMMITS = {
    "not JSON": b"{not json",
    "JSON but a list": b"[1, 2]",
    "unknown key": ndjson(header(), {"key": "rmrf", "value": {"path": "a.txt"}}),
    "value not an object": ndjson(header(), {"key": "file", "value": "a.txt"}),
    "no path": ndjson(header(), {"key": "file", "value": {"content": "eA=="}}),
    "bad base64": ndjson(header(), {"key": "file", "value": {"path": "b.txt", "content": "***", "encoding": "base64"}}),
    "content not a string": ndjson(header(), {"key": "file", "value": {"path": "b.txt", "content": 12}}),
    "lfsFile with a bad oid": ndjson(
        header(), {"key": "lfsFile", "value": {"path": "w.bin", "oid": "../x", "size": 1}}
    ),
    "lfsFile with a negative size": ndjson(
        header(), {"key": "lfsFile", "value": {"path": "w.bin", "oid": "a" * 64, "size": -1}}
    ),
    "no header": ndjson(add("b.txt")),
    "two headers": ndjson(header(), header(), add("b.txt")),
    "empty body": b"",
    "binary garbage": bytes(range(256)) * 4,
    "a good file then a bad line": ndjson(header(), add("good.txt")) + b"\n{broken",
    "the same path twice": ndjson(header(), add("b.txt"), add("b.txt")),
    "parentCommit not a string": ndjson({"key": "header", "value": {"summary": "x", "parentCommit": 5}}, add("b.txt")),
}


@pytest.mark.parametrize("case", list(MALFORMED_COMMITS))
def test_malformed_commit_bodies_answer_400_and_change_nothing(relhub, case):
    child, _ = relhub
    before = state(child.url)
    status, h, body = raw(child.url, "POST", f"/api/models/{REPO}/commit/main", MALFORMED_COMMITS[case], USERS["alice"])
    assert status == 400 and json.loads(body)["error"] and h.get("x-error-code") == "BadRequest", (status, body)
    assert state(child.url) == before


def test_an_lfs_pointer_to_content_never_uploaded_is_refused(relhub):
    child, _ = relhub
    before = state(child.url)
    item = {"key": "lfsFile", "value": {"path": "w.safetensors", "oid": "b" * 64, "size": 10}}
    assert raw(child.url, "POST", f"/api/models/{REPO}/commit/main", ndjson(header(), item), USERS["alice"])[0] == 422
    assert state(child.url) == before


@pytest.mark.parametrize(
    "route,body",
    [
        ("/api/repos/create", b"{nope"),
        ("/api/repos/create", b"[]"),
        ("/api/repos/create", b'{"name": 5}'),
        ("/api/repos/create", b'{"name": "ok", "type": "weights"}'),
        (f"/api/models/{REPO}/preupload/main", b"{nope"),
        (f"/api/models/{REPO}/preupload/main", b'{"files": [{"path": "../x"}]}'),
        (f"/api/models/{REPO}/preupload/main", b'{"files": "a"}'),
        (f"/{REPO}.git/info/lfs/objects/batch", b'{"objects": [{"oid": 1}]}'),
        (f"/{REPO}.git/info/lfs/objects/batch", b"\xff\xfe"),
    ],
)
def test_malformed_json_bodies_answer_400(relhub, route, body):
    child, _ = relhub
    status, _, text = raw(child.url, "POST", route, body, USERS["alice"], {"Content-Type": "application/json"})
    assert status == 400 and json.loads(text)["error"], (status, text)


def send_until_answered(url: str, path: str, headers: dict, body: bytes) -> bytes:
    """Send a request the way an impatient client does: keep writing the body, but read the answer as soon as the
    server gives one (a server refusing a body answers before it has read it all)."""
    import select
    import socket

    u = urlsplit(url)
    s = socket.create_connection((u.hostname, u.port), timeout=30)
    head = f"POST {path} HTTP/1.1\r\nHost: {u.hostname}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    pending, answer = memoryview(head.encode() + b"\r\n" + body), b""
    s.setblocking(False)
    try:
        for _ in range(100_000):  # bounded: each round moves data one way or the other
            readable, writable, _ = select.select([s], [s] if pending else [], [], 10)
            if readable:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                answer += chunk
                if b"\r\n\r\n" in answer:
                    break
            elif writable:
                try:
                    pending = pending[s.send(pending[: 2**20]) :]
                except (BrokenPipeError, ConnectionResetError):
                    pending = memoryview(b"")
            else:
                break
    finally:
        s.close()
    return answer


def test_oversized_bodies_are_refused_before_they_are_stored(relhub):
    child, top = relhub
    before = state(child.url)
    objects_before = sorted((top / "root" / "objects").rglob("*"))
    auth = {"Authorization": f"Bearer {USERS['alice']}"}
    big = ndjson(header(), add("big.txt", os.urandom(97 * 2**20)))  # 129 MiB once base64-encoded: over 128 MiB
    answer = send_until_answered(
        child.url, f"/api/models/{REPO}/commit/main", {**auth, "Content-Length": len(big)}, big
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # no Content-Length (chunked): the server counts as it reads
    chunk = b" " * 2**20
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in [json.dumps(header()).encode() + b"\n", *[chunk] * 130])
    answer = send_until_answered(
        child.url, f"/api/models/{REPO}/commit/main", {**auth, "Transfer-Encoding": "chunked"}, chunked + b"0\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # a Content-Length of 10 GiB is refused from the header alone (what a client sending Expect: 100-continue sees)
    answer = send_until_answered(
        child.url,
        f"/api/models/{REPO}/commit/main",
        {**auth, "Content-Length": 10 * 2**30, "Expect": "100-continue"},
        b"",
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert state(child.url) == before and sorted((top / "root" / "objects").rglob("*")) == objects_before


def test_lfs_upload_of_the_wrong_size_or_content_is_refused_and_a_retry_is_accepted(relhub):
    child, _ = relhub
    url, data = child.url, b"weights" * 100
    oid = hashlib.sha256(data).hexdigest()
    batch = json.dumps({"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]}).encode()
    _, _, text = raw(url, "POST", f"/{REPO}.git/info/lfs/objects/batch", batch, USERS["alice"])
    href = urlsplit(json.loads(text)["objects"][0]["actions"]["upload"]["href"]).path
    for payload, expected in [(data + b"extra", 413), (b"x" * len(data), 400)]:
        assert raw(url, "PUT", href, payload)[0] == expected
    item = {"key": "lfsFile", "value": {"path": "w.safetensors", "oid": oid, "size": len(data)}}
    assert raw(url, "POST", f"/api/models/{REPO}/commit/main", ndjson(header(), item), USERS["alice"])[0] == 422
    # like a presigned URL, the ticket holds for its object: huggingface_hub retries a PUT that timed out
    assert raw(url, "PUT", href, data)[0] == 200 and raw(url, "PUT", href, data)[0] == 200
    assert raw(url, "PUT", href, b"x" * len(data))[0] == 200  # stored already: answered, nothing overwritten
    assert raw(url, "PUT", "/lfs-upload/not-a-ticket", data)[0] == 403
    assert raw(url, "POST", f"/api/models/{REPO}/commit/main", ndjson(header(), item), USERS["alice"])[0] == 200
    assert raw(url, "GET", f"/{REPO}/resolve/main/w.safetensors", token=USERS["alice"])[2] == data


@pytest.mark.parametrize("rng", ["bytes=abc", "bytes=5-2", "bytes=999999-", "pages=1-2", "bytes=--1"])
def test_bad_range_headers_answer_416(relhub, rng):
    child, _ = relhub
    assert raw(child.url, "GET", f"/{REPO}/resolve/main/a.txt", token=USERS["alice"], headers={"Range": rng})[0] == 416
    status, _, body = raw(
        child.url, "GET", f"/{REPO}/resolve/main/a.txt", token=USERS["alice"], headers={"Range": "bytes=1-3"}
    )
    assert status == 206 and body == b"irs"


def test_ten_concurrent_commits_all_land_in_one_linear_history(relhub):
    child, _ = relhub
    api = HfApi(endpoint=child.url, token=USERS["alice"])
    before, _ = state(child.url)
    errors: list[BaseException] = []

    def commit(i: int) -> None:
        try:
            api.create_commit(REPO, [CommitOperationAdd(f"c/{i}.txt", f"{i}\n".encode())], commit_message=f"c{i}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    after, files = state(child.url)
    assert after[10:] == before and len(set(after)) == len(after)  # 10 new commits on top, each parent the one before
    assert {f"c/{i}.txt" for i in range(10)} <= set(files)
    for i in range(10):
        assert (
            api.hf_hub_download(REPO, f"c/{i}.txt")
            and Path(api.hf_hub_download(REPO, f"c/{i}.txt")).read_text() == f"{i}\n"
        )


def test_ten_concurrent_commits_on_one_parent_one_lands_the_rest_fail_cleanly(relhub):
    child, _ = relhub
    api = HfApi(endpoint=child.url, token=USERS["alice"])
    before, files_before = state(child.url)
    results: dict[int, object] = {}

    def commit(i: int) -> None:
        try:
            results[i] = api.create_commit(
                REPO, [CommitOperationAdd(f"p/{i}.txt", b"x")], commit_message=f"p{i}", parent_commit=before[0]
            )
        except HfHubHTTPError as e:
            results[i] = e

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    failed = [r for r in results.values() if isinstance(r, HfHubHTTPError)]
    assert len(results) == 10 and len(failed) == 9
    assert all(e.response.status_code == 412 for e in failed)
    after, files = state(child.url)
    assert after[1:] == before and len([p for p in files if p.startswith("p/")]) == 1
    assert {p: b for p, b in files.items() if not p.startswith("p/")} == files_before


def test_tokens_are_never_on_disk_in_logs_or_in_the_process_list(relhub):
    """Runs last in this module: every request above carried one of these tokens, as did the e2e pushes before."""
    child, top = relhub
    secrets_ = [t.encode() for t in (*USERS.values(), WRONG)]
    files = [p for p in top.rglob("*") if p.is_file()]
    assert len(files) > 10 and (top / "hub.log").exists()
    for p in files:
        data = p.read_bytes()
        assert not any(s in data for s in secrets_), p
    cmdline = Path(f"/proc/{child.proc.pid}/cmdline").read_bytes()
    assert b"hub" in cmdline and not any(s in cmdline for s in secrets_)


SOAK = r"""
import json, os, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from soppu_hub.hub.push import push_folder

root, token = Path(sys.argv[1]), sys.argv[2]
failures = []
for rnd in range(3):
    def one(i):
        d = root / f"r{rnd}" / f"soak-{i}"
        (d / "soppu").mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(os.urandom(300_000 + i))
        (d / "soppu" / "bundle.safetensors").write_bytes(os.urandom(60_000 + rnd))
        (d / "README.md").write_text(f"round {rnd}\n")
        try:
            push_folder(d, f"alice/soak-{i}", token=token, commit_message=f"round {rnd}")
        except Exception as e:
            failures.append(f"round {rnd} soak-{i}: {type(e).__name__}: {e} <- {e.__cause__!r}")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(64)))
print(json.dumps(failures))
"""


def test_eight_workers_push_64_repos_with_lfs_files_three_rounds_without_a_failure(relhub, tmp_path):
    """Concurrent LFS pushes through push_folder from a fresh interpreter, huggingface_hub's progress bars on: its
    upload thread_map once raced on tqdm's class lock and an upload failed as "Error while uploading" (6 to 15 of
    64 pushes a round, reproduced; the server was right). Zero failures; each repo's three commits in order, its
    files as the last round pushed them."""
    import subprocess
    import sys

    child, _ = relhub
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    res = subprocess.run(
        [sys.executable, "-c", SOAK, str(tmp_path), USERS["alice"]],
        env=dict(env, HF_ENDPOINT=child.url),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []
    api = HfApi(endpoint=child.url, token=USERS["alice"])
    for i in range(64):
        titles = [c.title for c in api.list_repo_commits(f"alice/soak-{i}")]
        assert titles[:3] == ["round 2", "round 1", "round 0"], (i, titles)
        last = tmp_path / "r2" / f"soak-{i}"
        lfs = {
            f.path: f.lfs.sha256
            for f in api.list_repo_tree(f"alice/soak-{i}", recursive=True)
            if getattr(f, "lfs", None)
        }
        assert lfs == {
            p: hashlib.sha256((last / p).read_bytes()).hexdigest()
            for p in ("adapter_model.safetensors", "soppu/bundle.safetensors")
        }, i
