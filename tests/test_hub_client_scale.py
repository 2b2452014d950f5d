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
    return subprocess.run(
        [sys.executable, "-m", "soppu_hub", "compress", *args, "--token", token, "--workers", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def bobs_repos(hub, tmp_path_factory):
    """bob: three LoRAs for the tiny Llama, one for another base, a full model and a soppu output."""
    from lab.samples import llama_module_shapes, synthetic_factors, write_adapter

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
    res = cli(
        "--author", "bob", "--no-push", "--out", str(tmp_path / "out2")
    )  # no filter: the other base is in, refused
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
    assert (
        f"unchanged {targets[0]}" in res.stdout
        and f"pushed {targets[1]}:" in res.stdout
        and f"pushed {targets[2]}:" in res.stdout
    )
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


def test_a_rerun_on_another_thread_count_pushes_nothing_but_a_real_change(hub, tmp_path):
    """One torch thread and two write other bytes for the same adapters (factor signs, last bits); pushed once, the
    two-thread rerun finds every repo holding the same adapter and commits nothing; a delta changed by 1% is
    pushed (issue 35)."""
    from safetensors.torch import load_file, save_file

    from lab.samples.collection import COLLECTION
    from soppu_hub.hub.push import changed_files, push_folder
    from soppu_hub.pipeline.unchanged import same_adapter

    srcs = sorted(str(p) for p in (COLLECTION / "adapters").iterdir() if p.is_dir())[:6]
    names = [Path(s).name for s in srcs]
    api = HfApi(token=BOB)
    out = tmp_path / "out"  # the same command twice: the same folder (cards name it), one thread then two

    def run(threads: int) -> None:
        code = (
            f"import sys, torch; torch.set_num_threads({threads}); from soppu_hub.cli import main; sys.exit(main("
            f"['compress', *{srcs!r}, '--no-push', '--quiet', '--overwrite', '--out', {str(out)!r}]))"
        )
        assert subprocess.run([sys.executable, "-c", code], env=os.environ).returncode == 0

    run(1)
    for n in names:
        assert push_folder(out / n, f"bob/rerun-{n}", token=BOB)
    commits = {n: len(api.list_repo_commits(f"bob/rerun-{n}")) for n in names}
    run(2)
    differ = 0
    for n in names:
        changed = changed_files(out / n, f"bob/rerun-{n}", token=BOB)
        differ += bool(changed)
        same = lambda c, n=n: same_adapter(out / n, f"bob/rerun-{n}", c, token=BOB)  # noqa: E731
        assert push_folder(out / n, f"bob/rerun-{n}", token=BOB, skip_unchanged=True, same=same).skipped, (n, changed)
    assert differ > 0  # the bytes did differ: the check compared adapters, not files
    assert {n: len(api.list_repo_commits(f"bob/rerun-{n}")) for n in names} == commits
    weights = out / names[0] / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if ".lora_B." in k)
    tensors[key] = tensors[key] * 1.01
    save_file(tensors, str(weights), metadata={"format": "pt"})
    changed = changed_files(out / names[0], f"bob/rerun-{names[0]}", token=BOB)
    assert not same_adapter(out / names[0], f"bob/rerun-{names[0]}", changed, token=BOB)


def test_a_collection_rerun_on_another_thread_count_publishes_nothing(hub, tmp_path):
    """The default for several pushed adapters is a collection (issue 34): a rerun with another thread count writes
    other bytes for the bases and every member's cores, yet the collection and every member keep their commits."""
    from lab.samples.collection import COLLECTION

    srcs = sorted(str(p) for p in (COLLECTION / "adapters").iterdir() if p.is_dir())[:4]
    api = HfApi(token=USERS["alice"])
    env = dict(os.environ, HF_TOKEN=USERS["alice"])
    out = tmp_path / "out"  # the same command twice (the cards record it), one thread then two

    def run(threads: int) -> dict:
        code = (
            f"import sys, torch; torch.set_num_threads({threads}); from soppu_hub.cli import main; sys.exit(main("
            f"['compress', *{srcs!r}, '--namespace', 'acme', '--quiet', '--overwrite', '--out', {str(out)!r}]))"
        )
        assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
        return json.loads((out / "report.json").read_text())

    first = run(1)
    coll = first["collection"]["name"]
    repos = [a["output"] for a in first["adapters"]]
    commits = {r: len(api.list_repo_commits(r)) for r in [coll, *repos]}
    second = run(2)
    assert second["collection"]["name"] == coll and coll.startswith("acme/soppu-bases-")
    assert {r: len(api.list_repo_commits(r)) for r in [coll, *repos]} == commits
