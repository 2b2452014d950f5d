"""The wheel is the product alone: built from this checkout, installed into a folder away from it, it compresses
local adapters with its own card templates and runs the Space against a backend; no lab, no weights, no data."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from soppu_hub.launch import Child, free_port, spawn_group

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e  # builds a wheel, starts the Space


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict, Path]:
    """(the wheel, an environment whose soppu_hub is the wheel's, a working folder outside the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-build-isolation",
            "--no-deps",
            str(REPO),
            "-w",
            str(root / "dist"),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheel = next((root / "dist").glob("soppu_hub-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(root / "site"), str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    env = dict(os.environ, PYTHONPATH=str(root / "site"))
    work = root / "work"
    work.mkdir()
    return wheel, env, work


def test_the_wheel_holds_the_product_and_its_card_templates_only(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith(("lab/", "tests/", "cards/", "docs/"))]
    assert not [n for n in names if n.endswith((".safetensors", ".gguf", ".bin", ".jsonl", ".png"))]
    assert {"soppu_hub/cards/templates/adapter.md", "soppu_hub/cards/templates/use-it.md"} <= set(names)
    assert wheel.stat().st_size < 400_000  # 0.22 MB at the time of writing: code and templates


def test_the_installed_wheel_compresses_and_writes_cards(installed, tiny_base):
    from lab.samples import llama_module_shapes, synthetic_factors, write_adapter

    _, env, work = installed
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import soppu_hub, importlib.util; print(soppu_hub.__file__); print(importlib.util.find_spec('lab'))",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    path, lab = where.stdout.split()
    assert path.startswith(env["PYTHONPATH"]) and lab == "None"  # the wheel's copy, and no lab beside it
    facs = synthetic_factors(llama_module_shapes(targets=("q_proj", "v_proj")), 2, 4, shared=2, seed=9)
    for i, f in enumerate(facs):
        write_adapter(work / f"w{i}", f, base_model=str(tiny_base), rank=4, alpha=8)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "soppu_hub",
            "compress",
            "./w0",
            "./w1",
            "--rank",
            "4",
            "--no-push",
            "--out",
            "out",
            "--quiet",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    card = (work / "out" / "w0" / "README.md").read_text()
    assert "## Use it" in card and "PeftModel.from_pretrained" in card  # adapter.md including use-it.md, from the wheel
    assert json.loads((work / "out" / "report.json").read_text())["adapters"]


def test_the_space_runs_from_the_wheel_against_a_backend(installed, backend):
    from gradio_client import Client

    from soppu_hub.clients import GenerationSettings
    from soppu_hub.clients.lorax import LoraxChatClient

    _, env, work = installed
    port = free_port()
    env = dict(
        env,
        LORAX_URL=backend,
        SOPPU_AUTHOR="alice",
        SOPPU_MAX_NEW_TOKENS="16",
        GRADIO_SERVER_NAME="127.0.0.1",
        GRADIO_SERVER_PORT=str(port),
        GRADIO_ANALYTICS_ENABLED="False",
    )
    proc = spawn_group([sys.executable, "-m", "soppu_hub.space.app"], cwd=work, env=env, stdout=subprocess.DEVNULL)
    child = Child(f"http://127.0.0.1:{port}", proc, f"http://127.0.0.1:{port}/").wait_ready(180)
    try:
        reply = (
            Client(child.url, verbose=False).submit("Hello!", [], "alice/support-bot-soppu", api_name="/chat").result()
        )
        want = LoraxChatClient(backend).complete(
            [{"role": "user", "content": "Hello!"}],
            "alice/support-bot-soppu",
            settings=GenerationSettings(max_new_tokens=16),
        )
        assert reply == want and reply
    finally:
        child.stop()
