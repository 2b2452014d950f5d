"""Hub at scale: sources by author, parallel downloads and pushes, a rerun pushes only what is missing or changed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import USERS
from huggingface_hub import HfApi

pytestmark = pytest.mark.e2e  # the real CLI against the session's Hub

BOB = USERS["bob"]


def cli(*args, token=BOB):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    return subprocess.run([sys.executable, "-m", "soppu_hub", "compress", *args, "--token", token, "--workers", "3"],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def bobs_repos(hub, tmp_path_factory):
    """bob: three LoRAs for the tiny Llama, one for another base, a full model and a soppu output."""
    from soppu_hub.devtools.samples import llama_module_shapes, synthetic_factors, write_adapter

    root = tmp_path_factory.mktemp("bob")
    api = HfApi(token=BOB)
    facs = synthetic_factors(llama_module_shapes(), 4, 4, shared=2, seed=11)
    for i, name in enumerate(["lora-a", "lora-b", "lora-c"]):
        folder = write_adapter(root / name, facs[i], base_model=hub.base_model, rank=4, alpha=8)
        api.create_repo(f"bob/{name}", exist_ok=True)
        api.upload_folder(repo_id=f"bob/{name}", folder_path=str(folder))
    other = write_adapter(root / "other", facs[3], base_model="someone/else", rank=4, alpha=8)
    api.create_repo("bob/lora-other-base", exist_ok=True)
    api.upload_folder(repo_id="bob/lora-other-base", folder_path=str(other))
    api.create_repo("bob/a-model", exist_ok=True)
    api.upload_file(path_or_fileobj=b'{"model_type": "llama"}', path_in_repo="config.json", repo_id="bob/a-model")
    api.create_repo("bob/old-soppu", exist_ok=True)
    api.upload_folder(repo_id="bob/old-soppu", folder_path=str(root / "lora-a"))
    api.upload_file(path_or_fileobj=b"---\ntags:\n- soppu\n---\n", path_in_repo="README.md", repo_id="bob/old-soppu")
    return hub


def test_author_lists_every_lora_for_the_base_model_and_leaves_out_the_rest(bobs_repos, tmp_path):
    res = cli("--author", "bob", "--base-model", bobs_repos.base_model, "--no-push", "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(a["source"] for a in report["adapters"]) == ["bob/lora-a", "bob/lora-b", "bob/lora-c"]
    res = cli("--author", "bob", "--no-push", "--out", str(tmp_path / "out2"))  # no filter: the other base is in, refused
    assert res.returncode == 2 and "different base models" in res.stderr and not (tmp_path / "out2").exists()


def test_author_without_lora_repos_is_one_line(bobs_repos, tmp_path):
    res = cli("--author", "nobody-here", "--no-push", "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "nobody-here has no LoRA adapter repos" in res.stderr
    assert not (tmp_path / "out").exists() and BOB not in res.stderr


def test_rerun_pushes_only_what_is_missing_or_changed(bobs_repos, tmp_path):
    api = HfApi(token=BOB)
    sources = ["bob/lora-a", "bob/lora-b", "bob/lora-c"]
    res = cli(*sources, "--rank", "4")
    assert res.returncode == 0, res.stderr
    targets = [f"{s}-soppu" for s in sources]
    assert all(f"pushed {t}:" in res.stdout for t in targets)
    commits = {t: len(api.list_repo_commits(t)) for t in targets}
    res = cli(*sources, "--rank", "4")  # nothing changed: nothing pushed
    assert res.returncode == 0 and all(f"unchanged {t}" in res.stdout for t in targets), res.stdout
    assert {t: len(api.list_repo_commits(t)) for t in targets} == commits
    api.delete_repo(targets[1])  # as if the first run had failed before this one
    api.upload_file(path_or_fileobj=b"stale", path_in_repo="soppu/old.bin", repo_id=targets[2])  # and this one differs
    res = cli(*sources, "--rank", "4")
    assert res.returncode == 0, res.stderr
    assert f"unchanged {targets[0]}" in res.stdout and f"pushed {targets[1]}:" in res.stdout and f"pushed {targets[2]}:" in res.stdout
    assert len(api.list_repo_commits(targets[0])) == commits[targets[0]]
    assert "soppu/old.bin" not in api.list_repo_files(targets[2])


def test_rerun_with_verify_added_pushes_one_commit_and_then_none(bobs_repos):
    """Weights, config and bundle are the same, but the card and report gain the functional check: a change, one
    new commit per repo; the same command again is none (run timings are kept out of what is pushed)."""
    api = HfApi(token=BOB)
    sources = ["bob/lora-a", "bob/lora-b"]
    targets = [f"{s}-soppu" for s in sources]
    assert cli(*sources, "--rank", "4").returncode == 0  # pushed, or already there from the test above
    commits = {t: len(api.list_repo_commits(t)) for t in targets}
    res = cli(*sources, "--rank", "4", "--verify")
    assert res.returncode == 0 and all(f"pushed {t}:" in res.stdout for t in targets), res.stdout + res.stderr
    assert {t: len(api.list_repo_commits(t)) for t in targets} == {t: n + 1 for t, n in commits.items()}
    card = Path(api.hf_hub_download(targets[0], "README.md")).read_text()
    assert "next-token agreement" in card and "| time |" not in card
    res = cli(*sources, "--rank", "4", "--verify")
    assert res.returncode == 0 and all(f"unchanged {t}" in res.stdout for t in targets), res.stdout + res.stderr
    assert {t: len(api.list_repo_commits(t)) for t in targets} == {t: n + 1 for t, n in commits.items()}
