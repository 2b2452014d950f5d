"""The user's main command over real HTTP: offline Hub server <-> real huggingface_hub client and PEFT."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import USERS
from helpers import peft_deltas
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError

pytestmark = pytest.mark.e2e  # real servers over loopback


def cli(*args, token: str | None = USERS["alice"]):
    env = dict(os.environ)
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "soppu_hub", "compress", *args], capture_output=True, text=True, env=env, timeout=600
    )


def one_line_error(res) -> str:
    assert res.returncode != 0, res.stdout
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, res.stderr
    assert "hf_test_" not in res.stderr + res.stdout  # tokens never printed
    return lines[0]


def test_pushed_repos_load_by_name_in_peft(hub, pushed):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from soppu_hub.collection.publish import member_bases
    from soppu_hub.compression.bundle import load_bundle

    # several adapters pushed: their bases go once into a collection repo by default, each repo holds its cores
    coll = json.loads((pushed / "report.json").read_text())["collection"]["name"]
    assert coll.startswith("alice/soppu-bases-") and "collection.json" in HfApi().list_repo_files(coll)
    for repo_id, name in [("alice/support-bot-soppu", "support-bot"), ("alice/pirate-talk-soppu", "pirate-talk")]:
        header = json.loads((pushed / name / "soppu" / "bundle.json").read_text())
        assert header["bases"]["collection"] == coll and header["bases"]["revision"]  # the collection's commit
        bundle = load_bundle(pushed / name / "soppu", bases=member_bases(pushed / name))
        files = HfApi().list_repo_files(repo_id)
        assert [f for f in files if f.endswith(".safetensors") and "/" not in f] == ["adapter_model.safetensors"]
        assert {
            "adapter_config.json",
            "README.md",
            "report.json",
            "soppu/bundle.safetensors",
            "soppu/bundle.json",
        } <= set(files)
        base = AutoModelForCausalLM.from_pretrained(hub.base_model)
        model = PeftModel.from_pretrained(base, repo_id)
        assert model.peft_config["default"].base_model_name_or_path == "soppu-samples/tiny-llama"
        deltas = peft_deltas(hub.base_model, repo_id)
        for module, (B, A) in bundle.factors(name).items():
            torch.testing.assert_close(deltas[module], B @ A, atol=1e-5, rtol=1e-4)


def test_own_bases_keeps_every_repo_self_contained(hub, tmp_path):
    """--own-bases: no collection repo, each repo's soppu/ holds its cluster's bases (the layout before issue 34)."""
    from lab.samples import llama_module_shapes, synthetic_factors, write_adapter
    from soppu_hub.pipeline.publish import default_collection

    facs = synthetic_factors(
        llama_module_shapes(hidden=64, layers=2, targets=("q_proj", "v_proj")), 2, 4, shared=2, seed=3
    )
    folders = [
        write_adapter(tmp_path / f"ownbases-{i}", f, base_model="x", rank=4, alpha=8) for i, f in enumerate(facs)
    ]
    res = cli(*map(str, folders), "--rank", "4", "--own-bases", "--namespace", "acme", "--quiet")
    assert res.returncode == 0, res.stderr
    targets = [f"acme/ownbases-{i}-soppu" for i in range(2)]
    for repo_id in targets:
        header = json.loads(open(hf_hub_download(repo_id, "soppu/bundle.json")).read())
        assert "bases" not in header and header["version"] in (2, 4)
    assert not HfApi().repo_exists(default_collection(targets))
    assert (
        default_collection(["b/x", "b/y"]) == default_collection(["b/y", "b/x"]) != default_collection(["b/x", "b/z"])
    )


def test_card_metadata_images_and_one_commit(hub, pushed):
    api = HfApi()
    for repo_id, source in [
        ("alice/support-bot-soppu", "alice/support-bot"),
        ("alice/pirate-talk-soppu", "alice/pirate-talk"),
    ]:
        card = ModelCard.load(repo_id)
        data = card.data.to_dict()
        assert data["base_model"] == "soppu-samples/tiny-llama" and data["base_model_relation"] == "adapter"
        assert data["library_name"] == "peft"
        assert {"soppu", "lora", "peft", "compression"} <= set(data["tags"])
        assert data["soppu"]["sources"] == [source]
        assert source in card.text and repo_id in card.text and "soppu-hub compress" in card.text
        assert f"](/{source})" in card.text and os.environ["HF_ENDPOINT"] not in card.text  # links outlive that Hub
        assert "hf_test_" not in card.content
        images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card.text)
        files = set(api.list_repo_files(repo_id))
        assert len(images) == 2 and all(img in files for img in images)
        commits = api.list_repo_commits(repo_id)
        assert len(commits) == 2 and commits[0].title.startswith("soppu-hub: JD-full rank 8")  # repo creation + ours
        report = json.loads(open(hf_hub_download(repo_id, "report.json")).read())
        assert [a["output"] for a in report["adapters"]] == ["alice/support-bot-soppu", "alice/pirate-talk-soppu"]
        assert [a["source"] for a in report["adapters"]] == hub.adapters
    tagged = {m.id for m in api.list_models(filter="soppu", author="alice")}
    assert {"alice/support-bot-soppu", "alice/pirate-talk-soppu"} <= tagged
    assert {m.id for m in api.list_models(search="pirate-talk-soppu")} == {"alice/pirate-talk-soppu"}
    assert not {m.id for m in api.list_models(author="bob")}


def test_rerun_adds_one_commit_and_private_push(hub, pushed, tmp_path):
    api = HfApi()
    # its own target: the shared sample repos stay as the backend tests expect them (LoRAX caches by name)
    assert cli(hub.adapters[0], "--rank", "8", "--push-to", "alice/rerun-support").returncode == 0
    before = len(api.list_repo_commits("alice/rerun-support"))
    res = cli(hub.adapters[0], "--rank", "4", "--push-to", "alice/rerun-support", "--quiet")
    assert res.returncode == 0 and res.stdout == res.stderr == "", res.stderr  # quiet: huggingface_hub's bars too
    assert len(api.list_repo_commits("alice/rerun-support")) == before + 1
    res = cli(hub.adapters[0], "--rank", "4", "--push-to", "acme/private-support", "--private")
    assert res.returncode == 0, res.stderr
    assert HfApi(token=USERS["alice"]).model_info("acme/private-support").private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=USERS["bob"]).model_info("acme/private-support")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("acme/private-support")


def test_failed_run_pushes_nothing(hub, pushed, tmp_path):
    from safetensors.torch import load_file, save_file

    api = HfApi(token=USERS["alice"])
    broken = tmp_path / "broken"
    commits = len(api.list_repo_commits("alice/support-bot-soppu"))
    snapshot_download(hub.adapters[1], local_dir=str(broken))
    t = load_file(str(broken / "adapter_model.safetensors"))
    next(iter(t.values()))[0, 0] = float("nan")
    save_file(t, str(broken / "adapter_model.safetensors"))
    api.create_repo("alice/broken-lora", exist_ok=True)
    api.upload_folder(repo_id="alice/broken-lora", folder_path=str(broken), allow_patterns=["adapter_*"])
    err = one_line_error(cli(hub.adapters[0], "alice/broken-lora"))
    assert "broken-lora" in err and "NaN" in err
    assert not api.repo_exists("alice/broken-lora-soppu")
    assert len(api.list_repo_commits("alice/support-bot-soppu")) == commits  # the good input was not pushed either


def test_revision_pin_and_verify(hub, tmp_path):
    from lab.samples import llama_module_shapes, synthetic_factors, write_adapter

    api = HfApi(token=USERS["alice"])
    api.create_repo("alice/versioned", exist_ok=True)
    v1 = api.upload_folder(
        repo_id="alice/versioned", folder_path=snapshot_download(hub.adapters[0]), allow_patterns=["adapter_*"]
    ).oid
    v2 = write_adapter(
        tmp_path / "v2",
        synthetic_factors(llama_module_shapes(), 1, 4, shared=0)[0],
        base_model=hub.base_model,
        rank=4,
        alpha=4,
    )
    api.upload_folder(repo_id="alice/versioned", folder_path=str(v2))
    res = cli(f"alice/versioned@{v1}", "--rank", "16", "--no-push", "--out", str(tmp_path / "out"), "--verify")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    entry = report["adapters"][0]
    assert entry["params_before"] == 16384  # rank 8 of v1, not rank 4 of v2
    assert entry["max_rel_error"] < 1e-5
    v = entry["verify"]
    assert v["next_token_agreement"] == 1.0 and v["mean_kl"] < 1e-6 and v["positions"] > 20
    card = (tmp_path / "out" / "versioned" / "README.md").read_text()
    assert "next-token agreement" in card
    assert "**Behaviour kept: the compressed adapter picks the original's next token 100% of the time" in card
    # the tiny base's config allows 2 shards: rank 8 zero-padded to 9 under r 16, exact in LoRAX at 1 and 2; the card
    # says the repo's bytes against the original's, and the sizes it read from the base on the Hub
    assert report["export"]["lorax_sizes"][:2] == [1, 2] and entry["export_rank"] == 16 and entry["padding_params"] > 0
    flat = " ".join(card.split())
    assert f"{entry['repo_bytes'] / entry['bytes_before']:.2f}x the original adapter's" in flat
    assert (
        f"(r = 16, its modules at rank 9 in {entry['export_dtype']})" in flat
        and "this export is exact at 1, 2 (padded for 2)" in flat
    )
    assert v["reply_agreement"] == 1.0 and v["reply_positions"] > 0  # the same reply, token for token
    res = cli("alice/versioned", "--rank", "2", "--no-push", "--out", str(tmp_path / "out2"), "--verify")
    v = json.loads((tmp_path / "out2" / "report.json").read_text())["adapters"][0]["verify"]
    assert v["mean_kl"] > 0 and 0 <= v["next_token_agreement"] <= 1
    # the same fit cut to smaller ranks: agreement against rank, rank 8 of a rank-8 adapter exact again
    res = cli(
        *hub.adapters,
        "--rank",
        "16",
        "--no-push",
        "--out",
        str(tmp_path / "out3"),
        "--verify",
        "--verify-ranks",
        "2,8,99",
    )
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "out3" / "report.json").read_text())
    sweep = report["rank_sweep"]
    assert [r["rank"] for r in sweep] == [2, 8, 16]  # 99 is not below the fitted rank: nothing to cut
    assert sweep[0]["compression_ratio"] > sweep[1]["compression_ratio"] > sweep[2]["compression_ratio"]
    assert sweep[-1]["mean_next_token_agreement"] == pytest.approx(
        sum(a["verify"]["next_token_agreement"] for a in report["adapters"]) / len(report["adapters"])
    )
    assert sweep[0]["mean_next_token_agreement"] < sweep[2]["mean_next_token_agreement"]
    for entry in report["adapters"]:
        assert set(entry["verify"]["by_rank"]) == {"2", "8"}
    folder = tmp_path / "out3" / hub.adapters[0].split("/")[1]
    assert (folder / "plots" / "agreement_by_rank.png").read_bytes()[:4] == b"\x89PNG"
    card = (folder / "README.md").read_text()
    assert "![Agreement with the originals against shared rank](plots/agreement_by_rank.png)" in card
    assert "| 2 | " in card and "| 16 | " in card
    err = one_line_error(cli(hub.adapters[0], "--no-push", "--out", str(tmp_path / "out4"), "--verify-ranks", "8"))
    assert "--verify-ranks needs --verify" in err and not (tmp_path / "out4").exists()
    err = one_line_error(
        cli(hub.adapters[0], "--no-push", "--out", str(tmp_path / "out4"), "--verify", "--verify-ranks", "8,x")
    )
    assert "comma-separated positive integers" in err


def test_network_failure_stops_cleanly(tmp_path):
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN=USERS["alice"], HF_HOME=str(tmp_path / "hf"))

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "soppu_hub", "compress", *a], capture_output=True, text=True, env=env, timeout=600
        )

    err = one_line_error(run("alice/support-bot", "--no-push", "--out", str(tmp_path / "out")))
    assert "cannot reach the Hub at http://127.0.0.1:9" in err and not (tmp_path / "out").exists()
    err = one_line_error(run("alice/support-bot"))
    assert "cannot reach the Hub at http://127.0.0.1:9" in err and "3 tries" in err


def test_model_config_asks_the_hub_before_a_stale_cache(hub, tmp_path):
    """A cache keyed by "main" can hold another model once published under the same id (the demo's shared cache held
    a 4-head test model as SmolLM2's id, and exports were padded for a shard count the real base refuses)."""
    from soppu_hub.hub.info import model_config

    api = HfApi(token=USERS["alice"])
    api.create_repo("alice/cfg-model", exist_ok=True)
    for heads in (4, 9):
        (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": heads, "num_key_value_heads": 3}))
        api.upload_file(
            path_or_fileobj=str(tmp_path / "config.json"), path_in_repo="config.json", repo_id="alice/cfg-model"
        )
        if heads == 4:
            hf_hub_download("alice/cfg-model", "config.json")  # cached as "main"
    assert model_config("alice/cfg-model")["num_attention_heads"] == 9
