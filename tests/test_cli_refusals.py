"""Reliability matrix, CLI rows: every refusal the README lists, through the real `soppu-hub compress` process.

Each case runs with the token on the command line (`--token`) and an `--out` folder; each must end with exactly
one `error:` line, a non-zero exit, no output folder (nor a staging folder beside it), nothing pushed to the Hub
and the token in no output. The cases run concurrently (they are independent processes), which also keeps the
matrix fast on two cores.
"""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import USERS
from huggingface_hub import HfApi
from test_peft_format_read import REFUSALS

pytestmark = pytest.mark.e2e  # the real CLI against the session's Hub

WRONG = "hf_cli_wrong_token_000111"
ALICE = USERS["alice"]


def _carry_extra(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(folder / "adapter_model.safetensors"))
    t["base_model.model.lm_head.modules_to_save.default.weight"] = torch.zeros(8, 64)
    save_file(t, str(folder / "adapter_model.safetensors"))


def _set_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def matrix(hub, sample_adapters, tmp_path_factory):
    """Build the inputs, run every case at once, return {case: (result, out folder)} and the Hub before/after."""
    from lab.samples import llama_module_shapes, synthetic_factors, write_adapter

    root = tmp_path_factory.mktemp("cli-matrix")
    good, other = (str(p) for p in sample_adapters)
    base_model = json.loads((sample_adapters[0] / "adapter_config.json").read_text())["base_model_name_or_path"]

    def broken(case: str) -> str:
        folder = root / "in" / case
        shutil.copytree(sample_adapters[0], folder)
        return str(folder)

    local: dict[str, tuple[list[str], str]] = {}
    for case, (breaker, expected) in REFUSALS.items():  # adapter files: the same breakers the reader's tests use
        folder = write_adapter(
            root / "in" / case,
            synthetic_factors(llama_module_shapes(), 1, 4, shared=0)[0],
            base_model=base_model,
            rank=4,
            alpha=8,
        )
        breaker(folder)
        local[f"adapter {case}"] = ([str(folder)], expected)
    other_base = write_adapter(
        root / "in" / "other-base",
        synthetic_factors(llama_module_shapes(), 1, 8, shared=0)[0],
        base_model="someone/else",
        rank=8,
        alpha=8,
    )
    wide = write_adapter(
        root / "in" / "wide",
        synthetic_factors(llama_module_shapes(hidden=96), 1, 8, shared=0)[0],
        base_model=base_model,
        rank=8,
        alpha=8,
    )
    carries = broken("carries-lm-head")
    _carry_extra(Path(carries))
    classifier = broken("classifier")
    _set_config(Path(classifier), task_type="SEQ_CLS")
    empty_list = root / "empty.txt"
    empty_list.write_text("# nothing yet\n\n")
    (root / "taken").mkdir()
    (root / "taken" / "keep.txt").write_text("mine")
    local.update(
        {
            "different base models": ([good, str(other_base)], "different base models"),
            "different module shapes": ([good, str(wide)], "not for the same architecture"),
            "different carried tensors": ([good, carries], "carry different uncompressed tensors"),
            "--verify on a classifier": ([classifier, "--verify"], "--verify compares next-token predictions"),
            "--lorax-tp 0": (
                [good, "--lorax-tp", "0"],
                "--lorax-tp must be auto or a tensor-parallel size from 1 to 8, got 0",
            ),
            "--lorax-tp two": (
                [good, "--lorax-tp", "two"],
                "--lorax-tp: takes auto or a tensor-parallel size (an integer), not 'two'",
            ),
            "unknown --export-dtype": ([good, "--export-dtype", "int4"], "invalid choice: 'int4'"),
            "--rank 0": ([good, "--rank", "0"], "--rank must be a positive integer"),
            "missing folder": ([str(root / "missing")], "not an existing folder and not a Hub repo id"),
            "neither folder nor id": (["not a repo"], "not an existing folder and not a Hub repo id"),
            "--clusters 0": ([good, other, "--clusters", "0"], "--clusters must be a positive integer or auto"),
            "--clusters more than adapters": (
                [good, other, "--clusters", "3"],
                "--clusters 3 is more than the 2 adapters",
            ),
            "--target-error outside (0, 1)": (
                [good, "--target-error", "1.5"],
                "--target-error must be between 0 and 1",
            ),
            "--max-adapter-error 0": ([good, "--max-adapter-error", "0"], "--max-adapter-error must be positive"),
            "unreadable --sources-file": (
                ["--sources-file", str(root / "no-such-list.txt")],
                "cannot read --sources-file",
            ),
            "empty --sources-file": (["--sources-file", str(empty_list)], "names no adapters"),
            "--author with no LoRA repos": (["--author", "nobody-at-all"], "nobody-at-all has no LoRA adapter repos"),
        }
    )

    alice = HfApi(token=ALICE)
    alice.create_repo("alice/data", repo_type="dataset", exist_ok=True)
    alice.create_repo("alice/app", repo_type="space", space_sdk="gradio", exist_ok=True)
    alice.create_repo("alice/secret-lora", private=True, exist_ok=True)
    alice.create_repo("alice/gated-lora", exist_ok=True)
    alice.upload_folder(repo_id="alice/gated-lora", folder_path=good)
    alice.update_repo_settings("alice/gated-lora", gated="auto")
    hub_cases = {
        "repo not found": (["alice/does-not-exist"], "repo not found", ALICE),
        "private repo of another user": (["alice/secret-lora"], "repo not found, or private", USERS["bob"]),
        "gated repo": (["alice/gated-lora"], "the repo is gated", USERS["bob"]),
        "a dataset repo": (["alice/data"], "is a dataset repo", ALICE),
        "a space repo": (["alice/app"], "is a space repo", ALICE),
        "a full model": (["soppu-samples/tiny-llama"], "a full model", ALICE),
        "unknown revision": (["alice/support-bot@no-such-branch"], "revision 'no-such-branch' does not exist", ALICE),
    }
    push_cases = {
        "no token": ([hub.adapters[0]], "needs a Hub token", None),
        "refused token": ([hub.adapters[0]], "token was refused", WRONG),
        "namespace the token cannot write": (
            [hub.adapters[0], "--namespace", "bob"],
            "cannot write to the namespace 'bob'",
            ALICE,
        ),
        "--push-to with two inputs": ([*hub.adapters, "--push-to", "alice/x"], "--push-to names one repo", ALICE),
        "--push-to another user's repo": ([hub.adapters[0], "--push-to", "bob/mine"], "cannot write", ALICE),
    }
    runs = {}
    for case, (args, expected) in local.items():
        runs[case] = ([*args, "--no-push"], expected, ALICE)
    for case, (args, expected, token) in hub_cases.items():
        runs[case] = ([*args, "--no-push"], expected, token)
    runs.update(push_cases)
    runs["--out exists and is not empty"] = ([good, "--no-push"], "already exists", ALICE)

    def repos() -> list[str]:
        api = HfApi(token=ALICE)
        return sorted(
            {m.id for a in ("alice", "bob", "acme") for m in api.list_models(author=a)}
            | {m.id for m in HfApi(token=USERS["bob"]).list_models(author="bob")}
        )

    def run(case: str):
        args, expected, token = runs[case]
        out = (
            root / "taken"
            if case.startswith("--out exists")
            else root / "out" / case.replace(" ", "_").replace("/", "_")
        )
        env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
        cmd = [
            sys.executable,
            "-m",
            "soppu_hub",
            "compress",
            *args,
            "--out",
            str(out),
            *(["--token", token] if token else []),
        ]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300), out

    (root / "out").mkdir()
    before = repos()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(runs, pool.map(run, runs)))
    return {"runs": runs, "results": results, "before": before, "after": repos(), "root": root}


CASES = [
    *(f"adapter {c}" for c in sorted(REFUSALS)),
    "different base models",
    "different module shapes",
    "different carried tensors",
    "--verify on a classifier",
    "--lorax-tp 0",
    "--lorax-tp two",
    "unknown --export-dtype",
    "--rank 0",
    "missing folder",
    "neither folder nor id",
    "--clusters 0",
    "--clusters more than adapters",
    "--target-error outside (0, 1)",
    "--max-adapter-error 0",
    "unreadable --sources-file",
    "empty --sources-file",
    "--author with no LoRA repos",
    "--push-to with two inputs",
    "repo not found",
    "private repo of another user",
    "gated repo",
    "a dataset repo",
    "a space repo",
    "a full model",
    "unknown revision",
    "no token",
    "refused token",
    "namespace the token cannot write",
    "--push-to another user's repo",
    "--out exists and is not empty",
]


@pytest.mark.parametrize("case", CASES)
def test_refusal_is_one_line_nonzero_nothing_written_or_pushed_no_token(matrix, case):
    _, expected, token = matrix["runs"][case]
    res, out = matrix["results"][case]
    assert res.returncode != 0, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    for secret in {*USERS.values(), WRONG}:
        assert secret not in res.stderr
    if case.startswith("--out exists"):
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_the_matrix_pushed_nothing(matrix):
    assert len(matrix["results"]) == len(CASES)
    assert matrix["after"] == matrix["before"]
