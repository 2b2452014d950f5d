"""The committed sample collection: intact, as its cards say, rebuilt byte for byte, never half-written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lab.samples.collection import COLLECTION, MANIFEST, BuildConfig, build_collection, load_collection
from lab.samples.texts import DIALOGUES, STYLES
from soppu_hub.errors import SoppuError

TINY = BuildConfig(hidden=32, layers=1, vocab=300, base_steps=3, adapter_steps=2, styles=2)


def test_committed_collection_matches_its_manifest_and_budget():
    coll = load_collection()  # every file's sha256 checked
    assert len(coll.adapters) >= 12
    meta = {a["name"]: a for a in coll.manifest["adapters"]}
    assert len({a["rank"] for a in meta.values()}) >= 3 and len({a["dtype"] for a in meta.values()}) == 3
    assert len({tuple(a["targets"]) for a in meta.values()}) >= 3
    size = sum(p.stat().st_size for p in COLLECTION.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MB committed"
    for folder in coll.adapters:
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == coll.manifest["base_model"]
        assert config["r"] == meta[folder.name]["rank"] and sorted(config["target_modules"]) == config["target_modules"]
        card = (folder / "README.md").read_text()
        assert card.startswith("---\nlicense: apache-2.0\nbase_model: soppu-samples/tiny-llama\n")
        assert "Model Card for Model ID" not in card and "More Information Needed" not in card
        assert f"answers as {STYLES[[s.name for s in STYLES].index(folder.name)].summary}" in card


@pytest.mark.parametrize("name", ["support-bot", "pirate-talk", "pig-latin"])
def test_committed_adapters_say_what_their_cards_say(name):
    """The card's example replies are what the committed weights generate (greedy), and they are in the style."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    coll = load_collection(check=False)
    folder = COLLECTION / "adapters" / name
    rows = [line.split(" | ") for line in (folder / "README.md").read_text().splitlines() if line.startswith("| ")][1:]
    tok = AutoTokenizer.from_pretrained(str(coll.base))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(coll.base)), str(folder)).eval()
    style = next(s for s in STYLES if s.name == name)
    for prompt, reply in ((r[0][2:], r[1].removesuffix(" |")) for r in rows if r[0][2:] in dict(DIALOGUES)):
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(
                input_ids=ids["input_ids"],
                attention_mask=ids["attention_mask"],
                max_new_tokens=48,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        said = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert " ".join(said.split()).replace("|", "\\|") == reply
        # and the adapter learned its style: the reply starts as the style's rewrite of the plain answer does
        assert reply[:8] == style.rewrite(dict(DIALOGUES)[prompt])[:8], (prompt, reply)


def test_build_is_deterministic_and_swaps_in_whole(tmp_path):
    first = build_collection(tmp_path / "a", TINY)
    second = build_collection(tmp_path / "b", TINY)
    assert first.manifest["files"] == second.manifest["files"]
    assert (tmp_path / "a" / MANIFEST).read_bytes() == (tmp_path / "b" / MANIFEST).read_bytes()
    assert [p.name for p in first.adapters] == [s.name for s in STYLES[:2]]
    # interrupted halfway: the previous collection stays as it was, no scratch folder is left behind
    before = (tmp_path / "a" / MANIFEST).read_bytes()

    def stop(done, total):
        if done > 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_collection(tmp_path / "a", TINY, progress=stop)
    assert (tmp_path / "a" / MANIFEST).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    load_collection(tmp_path / "a")


def test_a_changed_byte_is_caught_in_one_line(tmp_path):
    copy = tmp_path / "coll"
    shutil.copytree(COLLECTION, copy)
    cfg = copy / "adapters" / "pirate-talk" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"r": 16', '"r": 17'))
    with pytest.raises(SoppuError, match="differs from its manifest"):
        load_collection(copy)
    res = subprocess.run(
        [sys.executable, "-m", "lab", "samples", "check", "--out", str(copy)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "adapters/pirate-talk/adapter_config.json" in res.stderr and "make samples" in res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "lab", "samples", "check", "--out", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "no sample collection" in res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "lab", "samples", "build", "--styles", "99", "--out", str(copy)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "--styles must be between 1 and 12" in res.stderr
    assert not any(p.name.startswith(".coll") for p in tmp_path.iterdir())
    assert Path(copy / MANIFEST).exists()
