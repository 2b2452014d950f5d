"""Reliability matrix, CLI rows: every refusal the README lists, through the real `soppu-hub compress` process.

Each case runs with the token on the command line (`--token`) and an `--out` folder; each must end with exactly
one `error:` line, a non-zero exit, no output folder (nor a staging folder beside it), nothing pushed to the Hub
and the token in no output. The cases run concurrently (they are independent processes), which also keeps the
matrix fast on two cores.
"""

import json
import os
import shlex
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


# Every case once: case -> (compress arguments, the error line's text[, whose token (alice's), where it fails
# (LOCAL)]). "{name}" arguments are the inputs the matrix fixture builds; every case but PUSH ones runs with --no-push.
LOCAL, HUB, PUSH = "local", "hub", "push"
TABLE: dict[str, tuple] = {
    **{f"adapter {c}": ("{adapter_" + c + "}", REFUSALS[c][1]) for c in sorted(REFUSALS)},
    "different base models": ("{good} {other_base}", "different base models"),
    "different module shapes": ("{good} {wide}", "not for the same architecture"),
    "different carried tensors": ("{good} {carries}", "carry different uncompressed tensors"),
    "--verify on a classifier": ("{classifier} --verify", "--verify compares next-token predictions"),
    "--lorax-tp 0": ("{good} --lorax-tp 0", "--lorax-tp must be auto or a tensor-parallel size from 1 to 8, got 0"),
    "--lorax-tp two": (
        "{good} --lorax-tp two",
        "--lorax-tp: takes auto or a tensor-parallel size (an integer), not 'two'",
    ),
    "unknown --export-dtype": ("{good} --export-dtype int4", "invalid choice: 'int4'"),
    "--rank 0": ("{good} --rank 0", "--rank must be a positive integer"),
    "missing folder": ("{root}/missing", "not an existing folder and not a Hub repo id"),
    "neither folder nor id": ("'not a repo'", "not an existing folder and not a Hub repo id"),
    "--clusters 0": ("{good} {other} --clusters 0", "--clusters must be a positive integer or auto"),
    "--clusters more than adapters": ("{good} {other} --clusters 3", "--clusters 3 is more than the 2 adapters"),
    "--target-error outside (0, 1)": ("{good} --target-error 1.5", "--target-error must be between 0 and 1"),
    "--max-adapter-error 0": ("{good} --max-adapter-error 0", "--max-adapter-error must be positive"),
    "unreadable --sources-file": ("--sources-file {root}/no-such-list.txt", "cannot read --sources-file"),
    "empty --sources-file": ("--sources-file {empty_list}", "names no adapters"),
    "--author with no LoRA repos": ("--author nobody-at-all", "nobody-at-all has no LoRA adapter repos"),
    "repo not found": ("alice/does-not-exist", "repo not found", ALICE, HUB),
    "private repo of another user": ("alice/secret-lora", "repo not found, or private", USERS["bob"], HUB),
    "gated repo": ("alice/gated-lora", "the repo is gated", USERS["bob"], HUB),
    "a dataset repo": ("alice/data", "is a dataset repo", ALICE, HUB),
    "a space repo": ("alice/app", "is a space repo", ALICE, HUB),
    "a full model": ("soppu-samples/tiny-llama", "a full model", ALICE, HUB),
    "unknown revision": ("alice/support-bot@no-such-branch", "revision 'no-such-branch' does not exist", ALICE, HUB),
    "no token": ("{hub0}", "needs a Hub token", None, PUSH),
    "refused token": ("{hub0}", "token was refused", WRONG, PUSH),
    "namespace the token cannot write": ("{hub0} --namespace bob", "cannot write to the namespace 'bob'", ALICE, PUSH),
    "--push-to with two inputs": ("{hub0} {hub1} --push-to alice/x", "--push-to names one repo", ALICE, PUSH),
    "--push-to another user's repo": ("{hub0} --push-to bob/mine", "cannot write", ALICE, PUSH),
    "--out exists and is not empty": ("{good}", "already exists"),
}
CASES = list(TABLE)


@pytest.fixture(scope="module")
def matrix(hub, sample_adapters, tmp_path_factory):
    """Build the inputs, run every case at once, return {case: (result, out folder)} and the Hub before/after."""
    from lab.samples import llama_module_shapes, synthetic_factors, write_adapter

    root = tmp_path_factory.mktemp("cli-matrix")
    base_model = json.loads((sample_adapters[0] / "adapter_config.json").read_text())["base_model_name_or_path"]

    def broken(case: str) -> str:
        folder = root / "in" / case
        shutil.copytree(sample_adapters[0], folder)
        return str(folder)

    def synthetic(name: str, rank: int, base: str = base_model, hidden: int = 64) -> Path:
        factors = synthetic_factors(llama_module_shapes(hidden=hidden), 1, rank, shared=0)[0]
        return write_adapter(root / "in" / name, factors, base_model=base, rank=rank, alpha=8)

    inputs = {
        "good": str(sample_adapters[0]),
        "other": str(sample_adapters[1]),
        "other_base": str(synthetic("other-base", 8, base="someone/else")),
        "wide": str(synthetic("wide", 8, hidden=96)),
        "carries": broken("carries-lm-head"),
        "classifier": broken("classifier"),
        "empty_list": str(root / "empty.txt"),
        "root": str(root),
        "hub0": hub.adapters[0],
        "hub1": hub.adapters[1],
    }
    for case, (breaker, _) in REFUSALS.items():  # adapter files: the same breakers the reader's tests use
        folder = synthetic(case, 4)
        breaker(folder)
        inputs[f"adapter_{case}"] = str(folder)
    _carry_extra(Path(inputs["carries"]))
    _set_config(Path(inputs["classifier"]), task_type="SEQ_CLS")
    (root / "empty.txt").write_text("# nothing yet\n\n")
    (root / "taken").mkdir()
    (root / "taken" / "keep.txt").write_text("mine")

    alice = HfApi(token=ALICE)
    alice.create_repo("alice/data", repo_type="dataset", exist_ok=True)
    alice.create_repo("alice/app", repo_type="space", space_sdk="gradio", exist_ok=True)
    alice.create_repo("alice/secret-lora", private=True, exist_ok=True)
    alice.create_repo("alice/gated-lora", exist_ok=True)
    alice.upload_folder(repo_id="alice/gated-lora", folder_path=inputs["good"])
    alice.update_repo_settings("alice/gated-lora", gated="auto")
    runs = {}
    for case, (template, expected, *rest) in TABLE.items():
        token, kind = rest or (ALICE, LOCAL)
        args = [inputs.get(a[1:-1]) or a.format(**inputs) if a.startswith("{") else a for a in shlex.split(template)]
        runs[case] = ([*args, *(["--no-push"] if kind != PUSH else [])], expected, token)

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
