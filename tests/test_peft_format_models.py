"""The adapters people publish, rebuilt on tiny models of their architectures: compress, load back, same logits.

Target modules and task types follow published adapter configs of each family. Everything is built
offline from transformers' config classes; nothing is downloaded.
"""

import json

import pytest
import torch
from helpers import peft_clean, random_peft_adapter

from soppu_hub.cli import main
from soppu_hub.errors import AdapterError
from soppu_hub.peft_format.config import clean_config, plain_config
from soppu_hub.peft_format.read import read_adapter

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=96)


def _causal(config_cls, model_cls, **kw):
    def build():
        import transformers

        cfg = getattr(transformers, config_cls)(**{**TINY, **kw})
        return getattr(transformers, model_cls)(cfg)

    return build


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=64))


def _bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(**TINY, max_position_embeddings=64, num_labels=2))


def _roberta_cls():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(
        RobertaConfig(**TINY, max_position_embeddings=80, num_labels=3, pad_token_id=1)
    )


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(
        T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=96, decoder_start_token_id=0)
    )


KV = dict(num_key_value_heads=2)
ARCHS = {
    "gpt2": (_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM")),
    "bert-cls": (_bert_cls, dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    "roberta-cls": (_roberta_cls, dict(target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS")),
    "llama": (
        _causal("LlamaConfig", "LlamaForCausalLM", **KV),
        dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ),
    "mistral": (_causal("MistralConfig", "MistralForCausalLM", **KV), dict(target_modules=["q_proj", "v_proj"])),
    "gemma2": (_causal("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, **KV), dict(target_modules="all-linear")),
    "gemma3": (
        _causal("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, **KV),
        dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    ),
    "qwen2": (
        _causal("Qwen2Config", "Qwen2ForCausalLM", **KV),
        dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.05, use_rslora=True),
    ),
    "qwen3": (
        _causal("Qwen3Config", "Qwen3ForCausalLM", head_dim=8, **KV),
        dict(
            target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"down_proj": 3},
        ),
    ),
    "phi2": (
        _causal("PhiConfig", "PhiForCausalLM"),
        dict(target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]),
    ),
    "phi3": (
        _causal("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, **KV),
        dict(target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    ),
    "gpt-neox": (
        _causal("GPTNeoXConfig", "GPTNeoXForCausalLM"),
        dict(target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    ),
    "flan-t5": (_t5, dict(target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")),
    "mixtral-moe": (
        _causal("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2, **KV),
        dict(target_modules=["q_proj", "v_proj", "w1", "w2", "w3"]),
    ),
}


def _save(tmp_path, arch, seed, dtype):
    build, kw = ARCHS[arch]
    model, folder, base_dir = random_peft_adapter(tmp_path, build, kw, f"{arch}-{seed}", seed, scale=0.1, dtype=dtype)
    return folder, base_dir, type(model.base_model.model)


def _logits(model_cls, base_dir, adapter=None):
    from peft import PeftModel

    model = model_cls.from_pretrained(base_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if model_cls.__name__.startswith("T5"):
            return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_published_architectures_round_trip(tmp_path, arch):
    dtype = {"gemma2": torch.bfloat16, "qwen2": torch.float16}.get(arch, torch.float32)
    (f0, base_dir, model_cls), (f1, _, _) = _save(tmp_path, arch, 1, dtype), _save(tmp_path, arch, 2, dtype)
    want = [_logits(model_cls, base_dir, f) for f in (f0, f1)]
    written = json.loads((f0 / "adapter_config.json").read_text())  # as this architecture's PEFT save wrote it
    assert plain_config(written) == peft_clean(written) == clean_config(written)  # plain: no PEFT import needed
    assert not torch.allclose(want[0], _logits(model_cls, base_dir), atol=1e-4)
    out = tmp_path / "out"
    assert main(["compress", str(f0), str(f1), "--rank", "64", "--out", str(out), "--quiet", "--no-push"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["dtype"] == str(dtype).removeprefix("torch.")
    assert max(a["max_rel_error"] for a in report["adapters"]) < (1e-2 if dtype != torch.float32 else 1e-5)
    for folder, ref in zip((f0, f1), want):
        got = _logits(model_cls, base_dir, out / folder.name)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def test_moe_target_parameters_refused_with_the_reason(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssConfig, GptOssForCausalLM

    model = GptOssForCausalLM(
        GptOssConfig(
            **{
                **TINY,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "head_dim": 8,
                "num_key_value_heads": 2,
                "layer_types": ["full_attention"] * 2,
            }
        )
    )
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"])
    )
    peft_model.save_pretrained(tmp_path / "oss")
    with pytest.raises(AdapterError) as err:
        read_adapter(tmp_path / "oss")
    msg = str(err.value)
    assert "target_parameters" in msg and "only LoRA on modules" in msg and "weights have rank" not in msg
