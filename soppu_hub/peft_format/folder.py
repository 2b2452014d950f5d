"""An adapter folder's two files, read with every refusal in one line: adapter_config.json (a LoRA on modules, with
a rank and an alpha) and the weights (safetensors, or a .bin loaded weights-only); and PEFT's per-module scaling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import AdapterError
from .layout import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME


def refusal(name: str, what: str, fix: str) -> AdapterError:
    """The one-line error for adapter `name`: what is wrong; how to fix it."""
    return AdapterError(f"{name}: {what}; {fix}")


def read_config(folder: Path, name: str) -> dict:
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise refusal(
            name, f"{folder} is not a folder", "point at a PEFT adapter folder (adapter_config.json + weights)"
        )
    if not path.is_file():
        raise refusal(
            name, f"no {CONFIG_NAME} in {folder}", "point at a PEFT LoRA adapter folder saved with save_pretrained()"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise refusal(name, f"{CONFIG_NAME} is not valid JSON ({e})", "re-save the adapter with PEFT") from None
    if not isinstance(config, dict):
        raise refusal(name, f"{CONFIG_NAME} is not a JSON object", "re-save the adapter with PEFT")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise refusal(
            name, f"peft_type is {config.get('peft_type')!r}, not 'LORA'", "only LoRA adapters can be compressed"
        )
    if config.get("use_dora"):
        raise refusal(
            name,
            "it is a DoRA adapter (use_dora=true), whose magnitude vector JD cannot represent",
            "compress a plain LoRA adapter instead",
        )
    if config.get("target_parameters"):
        raise refusal(
            name,
            f"it uses target_parameters ({', '.join(map(str, config['target_parameters']))}), LoRA on raw "
            "parameters such as MoE experts; only LoRA on modules (target_modules) is compressed",
            "compress adapters trained with target_modules only",
        )
    if not isinstance(config.get("r"), int) or config["r"] < 1 or "lora_alpha" not in config:
        raise refusal(name, f"{CONFIG_NAME} lacks a valid 'r' or 'lora_alpha'", "re-save the adapter with PEFT")
    return config


def load_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    st, bin_ = folder / SAFETENSORS_NAME, folder / BIN_NAME
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError) as e:
            raise refusal(
                name, f"{SAFETENSORS_NAME} is corrupt ({str(e).splitlines()[0]})", "download or save it again"
            ) from None
    if bin_.is_file():
        try:
            state = torch.load(str(bin_), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise refusal(
                name, f"{BIN_NAME} cannot be read safely ({type(e).__name__})", "convert it to safetensors"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise refusal(name, f"{BIN_NAME} is not a state dict of tensors", "save the adapter again with PEFT")
        return state
    raise refusal(
        name,
        f"no {SAFETENSORS_NAME} or {BIN_NAME} in {folder}",
        "the weights file is missing: download or save it again",
    )


def module_scaling(config: dict, module: str) -> tuple[int, float]:
    """(r, scaling) for one module as PEFT computes them, honouring rank_pattern / alpha_pattern / rsLoRA."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r, alpha = config["r"], config["lora_alpha"]
    if rank_pattern or alpha_pattern:
        from peft.utils.other import (
            get_pattern_key,  # PEFT's own matching rule; imported only when needed (slow import)
        )

        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), r)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha)
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, float(scaling)
