"""Shared test helpers: reference computations through the real libraries."""

from pathlib import Path


def peft_deltas(base_folder: Path, adapter_folder: Path) -> dict:
    """Module path -> delta weight exactly as PEFT computes it for a loaded adapter (out x in)."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_folder))
    out = {}
    for name, mod in model.base_model.model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            delta = mod.get_delta_weight("default").detach().float()
            out[name] = delta.T if mod.fan_in_fan_out else delta
    return out
