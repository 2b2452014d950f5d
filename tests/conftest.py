import atexit
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# huggingface_hub reads these at import: set them before any test module imports it.
HUB_PORT = _free_port()
HUB_URL = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_ENDPOINT"] = HUB_URL
# Every temp folder the suite and its subprocesses make lands in one, removed when the session ends: what a killed
# subprocess (the fault tests) leaves, pytest's kept basetemps and Gradio's uploads stay off a shared machine's /tmp.
SCRATCH = Path(tempfile.mkdtemp(prefix="soppu-tests-"))
os.environ["TMPDIR"] = tempfile.tempdir = str(SCRATCH)
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
os.environ["HF_HOME"] = str(SCRATCH / "hf-home")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HF_HUB_OFFLINE", None)

USERS = {
    "alice": "hf_test_alice",
    "bob": "hf_test_bob",
    "carol": "hf_test_carol",  # the fault tests' user: repos no other test lists
    "soppu-samples": "hf_test_samples",
    "HuggingFaceTB": "hf_test_hftb",
}
ORGS = {"acme": ["alice"]}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from lab.samples import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def sample_adapters(tmp_path_factory, tiny_base) -> list[Path]:
    from lab.samples import write_sample_adapters

    return write_sample_adapters(tmp_path_factory.mktemp("adapters"), base_model=str(tiny_base))


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory):
    """The offline Hub as a real HTTP server on loopback: data in <dir>/root, its stdout and stderr in <dir>/hub.log."""
    from soppu_hub.launch import start_hub

    top = tmp_path_factory.mktemp("hub")
    child = start_hub(top / "root", USERS, orgs=ORGS, port=HUB_PORT, log=top / "hub.log")
    try:
        yield child, top
    finally:
        child.stop()


@pytest.fixture(scope="session")
def hub(hub_server, tmp_path_factory):
    """The offline Hub seeded with the tiny base and two adapters."""
    from lab.demo import seed_hub

    child, _ = hub_server
    return seed_hub(
        child.url, tmp_path_factory.mktemp("seed"), user_token=USERS["alice"], base_token=USERS["soppu-samples"]
    )


@pytest.fixture(scope="session")
def pushed(hub, tmp_path_factory):
    """The sample adapters compressed together by the real CLI and pushed to alice/<name>-soppu."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("e2e") / "out"
    env = dict(os.environ, HF_TOKEN=USERS["alice"])
    res = subprocess.run(
        [sys.executable, "-m", "soppu_hub", "compress", *hub.adapters, "--rank", "8", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="session")
def local_adapters(tmp_path_factory, hub):
    """An allowed local adapter folder for the backend: two good adapters and one for another base model."""
    from lab.samples import llama_module_shapes, synthetic_factors, write_adapter, write_sample_adapters

    root = tmp_path_factory.mktemp("local-adapters")
    write_sample_adapters(root, base_model=hub.base_model)
    write_adapter(
        root / "other-base",
        synthetic_factors(llama_module_shapes(), 1, 4, shared=0)[0],
        base_model="someone/else",
        rank=4,
        alpha=4,
    )
    return root


@pytest.fixture(scope="session")
def backend(hub, pushed, local_adapters):
    """`soppu-hub serve` as a real process on loopback, base model pulled from the offline Hub by name."""
    from soppu_hub.launch import start_backend

    child = start_backend(
        hub.base_model, extra=["--adapter-dir", str(local_adapters), "--max-adapters", "3", "--max-total-tokens", "256"]
    )
    try:
        yield child.url
    finally:
        child.stop()


@pytest.fixture(scope="session")
def space(backend):
    """The Space (what `python space/app.py` runs) as a real process against the session's backend, listing alice's."""
    from soppu_hub.launch import start_space

    child = start_space(dict(os.environ, LORAX_URL=backend, SOPPU_AUTHOR="alice", SOPPU_MAX_NEW_TOKENS="32"))
    try:
        yield child.url
    finally:
        child.stop()
