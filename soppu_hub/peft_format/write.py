"""The one writer of PEFT LoRA adapter folders (exports, sample adapters): factors and extras under PEFT's keys."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .layout import CONFIG_NAME, KEY_PREFIX, SAFETENSORS_NAME
from .read import EMBEDDING


def write_peft_folder(
    folder: str | Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    config: dict,
    *,
    kinds: dict[str, str] | None = None,
    extras: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A PEFT LoRA folder: factors (B, A) under PEFT's keys, `extras` under their own keys, `config` as is."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = dict(extras or {})
    for name, (B, A) in factors.items():
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B")
            if (kinds or {}).get(name) == EMBEDDING
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{KEY_PREFIX}{name}.{a_key}"] = A.contiguous()
        tensors[f"{KEY_PREFIX}{name}.{b_key}"] = B.contiguous()
    save_file(tensors, str(folder / SAFETENSORS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder
