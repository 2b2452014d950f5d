"""adapter_config.json without importing PEFT for plain configs: the same answer as PEFT's LoraConfig, always.

The fast path exists so that `soppu-hub join` fits its 5 s (importing peft pulls in transformers); PEFT stays
the judge: the snapshot is PEFT's own output, and every config here goes through both paths.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import peft_clean as with_peft

import soppu_hub
from soppu_hub.peft_format import config as cfg

OLD_PEFT = {  # as PEFT 0.3-0.6 saved them: keys that no longer exist, fewer fields
    "base_model_name_or_path": "gpt2",
    "bias": "none",
    "enable_lora": None,
    "fan_in_fan_out": True,
    "inference_mode": True,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "merge_weights": False,
    "modules_to_save": None,
    "peft_type": "LORA",
    "r": 8,
    "target_modules": ["c_attn"],
    "task_type": "CAUSAL_LM",
}
PLAIN = [
    OLD_PEFT,
    {
        "peft_type": "LORA",
        "r": 16,
        "lora_alpha": 32,
        "target_modules": ["v_proj", "q_proj", "q_proj"],
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
        "revision": "main",
        "peft_version": "0.13.2",
    },
    {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8.0,
        "target_modules": ["query", "value"],
        "task_type": "SEQ_CLS",
        "modules_to_save": ["classifier", "score"],
        "bias": "lora_only",
        "lora_dropout": 0.1,
    },
    {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q", "v"], "task_type": "SEQ_2_SEQ_LM"},
    {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": r".*\.(q_proj|v_proj)$", "use_rslora": True},
    {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 8,
        "target_modules": ["q_proj"],
        "layers_to_transform": [0, 1],
        "layers_pattern": "layers",
        "rank_pattern": {"q_proj": 4},
        "alpha_pattern": {"layers.0.q_proj": 2.5},
    },
    {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 2,
        "target_modules": ["dense"],
        "lora_bias": True,
        "init_lora_weights": False,
        "exclude_modules": ["lm_head"],
        "auto_mapping": {"base_model_class": "GPTNeoXForCausalLM"},
        "task_type": None,
    },
    {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": None,
        "init_lora_weights": "gaussian",
        "layers_to_transform": 3,
        "use_dora": False,
        "megatron_core": "megatron.core",
        "loftq_config": {},
    },
]
NOT_PLAIN = [  # valid for PEFT, but fields the fast path leaves to it
    {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "init_lora_weights": "pissa"},
    {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "layer_replication": [[0, 2], [1, 3]]},
    {"peft_type": "lora", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj"]},
    {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "inference_mode": 1},
]
INVALID = [  # PEFT refuses these; the fast path must not accept them
    {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ".*q_proj", "layers_to_transform": [0]},
    {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "layers_pattern": "layers"},
    {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 8,
        "target_modules": ["q_proj"],
        "lora_bias": True,
        "init_lora_weights": "gaussian",
    },
    {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "NOT_A_TASK"},
    {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_parameters": "experts"},
]
EXPORT = {"r": 24, "lora_alpha": 24, "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}}


def shipped_configs() -> list[dict]:
    """Every adapter_config.json the lab holds (the sample and real collections), as users' files."""
    root = Path(soppu_hub.__file__).parents[1] / "lab"
    return [json.loads(p.read_text()) for p in sorted(root.rglob("adapter_config.json"))]


def test_the_snapshot_is_what_the_installed_peft_says():
    recorded = json.loads(cfg.SNAPSHOT.read_text())
    assert recorded == cfg.peft_snapshot(), "regenerate it: python -m soppu_hub.peft_format.config"
    assert list(recorded["defaults"]) == list(cfg._with_peft({}))  # PEFT's field order, as it writes them


@pytest.mark.parametrize("overrides", [{}, EXPORT], ids=["read", "export"])
def test_plain_configs_come_out_exactly_as_peft_writes_them(overrides):
    configs = PLAIN + shipped_configs()
    assert len(shipped_configs()) >= 10
    for config in configs:
        fast = cfg.plain_config(config, **overrides)
        assert fast is not None, config
        want = with_peft(config, **overrides)
        assert list(fast.items()) == list(want.items()), config  # same keys, same order, same values
        assert cfg.clean_config(config, **overrides) == want


def test_configs_the_fast_path_leaves_alone_still_get_peft_s_answer():
    for config in NOT_PLAIN:
        assert cfg.plain_config(config) is None, config
        assert cfg.clean_config(config) == with_peft(config)


def test_invalid_configs_are_refused_by_peft_not_waved_through():
    for config in INVALID:
        assert cfg.plain_config(config) is None, config
        with pytest.raises((ValueError, TypeError)):
            cfg.clean_config(config)


def test_another_installed_peft_version_goes_through_peft(tmp_path, monkeypatch):
    snap = json.loads(cfg.SNAPSHOT.read_text())
    (tmp_path / "old.json").write_text(json.dumps({**snap, "peft_version": "0.0.1"}))
    monkeypatch.setattr(cfg, "SNAPSHOT", tmp_path / "old.json")
    cfg._snapshot.cache_clear()
    try:
        assert cfg.plain_config(PLAIN[1]) is None
        assert cfg.clean_config(PLAIN[1]) == with_peft(PLAIN[1])
    finally:
        cfg._snapshot.cache_clear()


def test_reading_and_exporting_a_plain_adapter_imports_neither_peft_nor_transformers(tmp_path):
    code = f"""
import sys
from lab.samples import write_sample_adapters
from soppu_hub.peft_format.read import read_adapter
from soppu_hub.peft_format.config import clean_config
folder = write_sample_adapters({str(tmp_path)!r}, names=("one",))[0]
adapter = read_adapter(folder)
clean_config(adapter.config, r=4, lora_alpha=4, use_rslora=False, use_dora=False, rank_pattern={{}}, alpha_pattern={{}})
print(sorted(m for m in ("peft", "transformers") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
