"""What JD does not compress travels unchanged: heads, saved embeddings, base_layer weights, biases, tokens.

Each case trains nothing: PEFT builds the adapter with random (non-zero) weights everywhere it would
train, saves it, and the test checks that base + export gives the logits of base + original at lossless rank.
"""

import json

import pytest
import torch
from helpers import random_peft_adapter

from soppu_hub.cli import main
from soppu_hub.errors import IncompatibleAdaptersError
from soppu_hub.peft_format.read import read_adapter


def _gpt2_cls():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    return GPT2ForSequenceClassification(
        GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, pad_token_id=0, num_labels=3)
    )


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    )


CASES = {
    # name: (base builder, LoraConfig kwargs, save kwargs, expected carried key fragments)
    "gpt2_classification": (
        _gpt2_cls,
        dict(task_type="SEQ_CLS", target_modules=["c_attn"], fan_in_fan_out=True),
        {},
        ["score.weight"],
    ),
    "llama_saved_embed_and_lm_head": (
        _llama,
        dict(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"]),
        {},
        ["model.embed_tokens.weight", "lm_head.weight"],
    ),
    "llama_lora_on_lm_head": (_llama, dict(target_modules=["q_proj", "lm_head"]), {}, ["lm_head.base_layer.weight"]),
    "llama_embedding_lora": (
        _llama,
        dict(target_modules=["q_proj", "embed_tokens"]),
        {},
        ["embed_tokens.base_layer.weight"],
    ),
    "llama_lora_bias": (
        _llama,
        dict(target_modules=["q_proj", "down_proj"], lora_bias=True),
        {},
        ["q_proj.lora_B.bias"],
    ),
    "llama_trainable_tokens": (
        _llama,
        dict(target_modules=["q_proj"], trainable_token_indices=[3, 7]),
        {},
        ["embed_tokens.token_adapter.trainable_tokens_delta"],
    ),
    "llama_save_embedding_layers": (
        _llama,
        dict(target_modules=["q_proj"]),
        {"save_embedding_layers": True},
        ["model.embed_tokens.weight", "lm_head.weight"],
    ),
}


_SAVED_IN_FULL = ("embed_tokens", "lm_head")


def _make(tmp_path, case, seed):
    """Base saved once per case, and one PEFT adapter with every trainable tensor randomised, plus the
    embedding weights PEFT saves in full (as after resizing the vocabulary), so that carrying them is tested."""
    build, lora_kw, save_kw, _ = CASES[case]
    return random_peft_adapter(
        tmp_path,
        build,
        lora_kw,
        f"{case}-{seed}",
        seed,
        save_kwargs=save_kw,
        also=lambda name: any(e in name for e in _SAVED_IN_FULL) and "lora_" not in name,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_base_plus_export_equals_base_plus_original(tmp_path, case):
    from peft import PeftModel

    (m0, f0, base_dir), (_, f1, _) = _make(tmp_path, case, 1), _make(tmp_path, case, 2)
    model_cls = type(m0.base_model.model)
    ids = torch.randint(1, 60, (2, 9), generator=torch.Generator().manual_seed(3))

    def logits(adapter=None):
        model = model_cls.from_pretrained(base_dir)
        model = PeftModel.from_pretrained(model, adapter).eval() if adapter else model.eval()
        with torch.no_grad():
            return model(input_ids=ids).logits

    want = [logits(f) for f in (f0, f1)]
    plain = logits()
    assert not torch.allclose(want[0], plain, atol=1e-3)

    originals = [read_adapter(f) for f in (f0, f1)]
    expected = CASES[case][3]
    for a in originals:
        assert all(any(k.endswith(e) for k in a.carried_names) for e in expected), a.carried_names

    out = tmp_path / "out"
    assert main(["compress", str(f0), str(f1), "--rank", "64", "--out", str(out), "--quiet", "--no-push"]) == 0
    report = json.loads((out / "report.json").read_text())
    carried = sum(a.carried_params for a in originals)
    assert carried > 0 and report["carried_params"] == carried
    for entry, a in zip(report["adapters"], originals):
        assert entry["carried"] == a.carried_names and entry["carried_params"] == a.carried_params
        assert entry["params_before"] == a.lora_params + a.carried_params and entry["max_rel_error"] < 1e-5
    bundle_params = report["params_after"] - carried
    assert bundle_params > 0 and report["params_before"] == sum(a.num_params for a in originals)

    for folder, ref in zip((out / f0.name, out / f1.name), want):
        torch.testing.assert_close(logits(folder), ref, atol=2e-5, rtol=1e-4)


def test_embedding_lora_is_compressed_not_carried(tmp_path):
    _, f0, _ = _make(tmp_path, "llama_embedding_lora", 1)
    _, f1, _ = _make(tmp_path, "llama_embedding_lora", 2)
    a = read_adapter(f0)
    assert a.modules["model.embed_tokens"].kind == "embedding"
    assert not any("lora_embedding" in k for k in a.carried_names)
    out = tmp_path / "out"
    assert main(["compress", str(f0), str(f1), "--rank", "4", "--out", str(out), "--quiet", "--no-push"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["adapters"][0]["modules"]["model.embed_tokens"]["rel_error"] < 1  # shares a basis, so lossy at 4
    from safetensors.torch import load_file

    keys = load_file(str(out / f0.name / "adapter_model.safetensors"))
    assert keys["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (
        9,
        96,
    )  # rank 4, written at 9: config r 16 for LoRAX tp 1, 2
    assert keys["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 9)


def test_adapters_must_agree_on_what_they_carry(tmp_path):
    _, with_head, _ = _make(tmp_path, "llama_saved_embed_and_lm_head", 1)
    from peft import LoraConfig, get_peft_model

    base = type(_llama()).from_pretrained(tmp_path / "base")
    plain = tmp_path / "plain"
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(
        plain
    )
    cfg = json.loads((plain / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "base")
    (plain / "adapter_config.json").write_text(json.dumps(cfg))
    from soppu_hub.compression.plan import check_compatible

    with pytest.raises(IncompatibleAdaptersError, match="carry different uncompressed tensors"):
        check_compatible([read_adapter(with_head), read_adapter(plain)])
