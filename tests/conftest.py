import os
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
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="soppu-tests-hf-home-")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HF_HUB_OFFLINE", None)

USERS = {"alice": "hf_test_alice", "bob": "hf_test_bob", "soppu-samples": "hf_test_samples"}
ORGS = {"acme": ["alice"]}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from soppu_hub.samples import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def sample_adapters(tmp_path_factory, tiny_base) -> list[Path]:
    from soppu_hub.samples import write_sample_adapters

    return write_sample_adapters(tmp_path_factory.mktemp("adapters"), base_model=str(tiny_base))


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """The offline Hub as a real HTTP server on loopback, seeded with the tiny base and two adapters."""
    from soppu_hub.demo import seed_hub
    from soppu_hub.hubserver.process import start_hub

    proc = start_hub(tmp_path_factory.mktemp("hub-data"), USERS, orgs=ORGS, port=HUB_PORT)
    try:
        seeded = seed_hub(proc.url, tmp_path_factory.mktemp("seed"), user_token=USERS["alice"], samples_token=USERS["soppu-samples"])
        yield seeded
    finally:
        proc.stop()
