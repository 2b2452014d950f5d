"""Read a PEFT LoRA adapter folder into factors with PEFT's scaling folded in, and refuse what JD can't take."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import AdapterError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoraModule:
    """One adapted linear layer: delta W = B @ A (out x in), with the PEFT scaling already in B."""

    A: torch.Tensor  # (k, in_features)
    B: torch.Tensor  # (out_features, k), scaling folded in
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the delta."""
        return self.B.shape[0], self.A.shape[1]


@dataclass
class LoraAdapter:
    """A LoRA adapter as JD sees it; `config` is the original adapter_config.json."""

    name: str
    source: str
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def num_params(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())


def _fail(name: str, what: str, fix: str) -> AdapterError:
    return AdapterError(f"{name}: {what}; {fix}")


def read_config(folder: Path, name: str) -> dict:
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise _fail(name, f"{folder} is not a folder", "point at a PEFT adapter folder (adapter_config.json + weights)")
    if not path.is_file():
        raise _fail(name, f"no {CONFIG_NAME} in {folder}", "point at a PEFT LoRA adapter folder saved with save_pretrained()")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(name, f"{CONFIG_NAME} is not valid JSON ({e})", "re-save the adapter with PEFT") from None
    if not isinstance(config, dict):
        raise _fail(name, f"{CONFIG_NAME} is not a JSON object", "re-save the adapter with PEFT")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise _fail(name, f"peft_type is {config.get('peft_type')!r}, not 'LORA'", "only LoRA adapters can be compressed")
    if config.get("use_dora"):
        raise _fail(name, "it is a DoRA adapter (use_dora=true), whose magnitude vector JD cannot represent",
                    "compress a plain LoRA adapter instead")
    if not isinstance(config.get("r"), int) or config["r"] < 1 or "lora_alpha" not in config:
        raise _fail(name, f"{CONFIG_NAME} lacks a valid 'r' or 'lora_alpha'", "re-save the adapter with PEFT")
    return config


def _load_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    st, bin_ = folder / SAFETENSORS_NAME, folder / BIN_NAME
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError) as e:
            raise _fail(name, f"{SAFETENSORS_NAME} is corrupt ({str(e).splitlines()[0]})", "download or save it again") from None
    if bin_.is_file():
        try:
            state = torch.load(str(bin_), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise _fail(name, f"{BIN_NAME} cannot be read safely ({type(e).__name__})", "convert it to safetensors") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise _fail(name, f"{BIN_NAME} is not a state dict of tensors", "save the adapter again with PEFT")
        return state
    raise _fail(name, f"no {SAFETENSORS_NAME} or {BIN_NAME} in {folder}", "the weights file is missing: download or save it again")


def module_scaling(config: dict, module: str) -> tuple[int, float]:
    """(r, scaling) for one module as PEFT computes them, honouring rank_pattern / alpha_pattern / rsLoRA."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r, alpha = config["r"], config["lora_alpha"]
    if rank_pattern or alpha_pattern:
        from peft.utils.other import get_pattern_key  # PEFT's own matching rule; imported only when needed (slow import)

        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), r)
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha)
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, float(scaling)


def read_adapter(folder: str | Path, *, name: str | None = None, source: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA folder. Factors become float32 (float64 stays float64): exact for bf16/fp16."""
    folder = Path(folder)
    name = name or folder.name
    config = read_config(folder, name)
    tensors = _load_tensors(folder, name)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if "lora_embedding_" in key or "lora_magnitude_vector" in key:
            raise _fail(name, f"tensor {key} is not a LoRA linear factor", "only LoRA on linear/Conv1D layers can be compressed")
        match = _KEY_RE.match(key)
        if not match:
            raise _fail(name, f"unexpected tensor {key} (modules_to_save or another PEFT method)",
                        "compress an adapter that holds only lora_A / lora_B weights")
        module = match["module"].removeprefix(KEY_PREFIX)
        pairs.setdefault(module, {})[match["side"]] = tensor
    if not pairs:
        raise _fail(name, "the weights file holds no lora_A / lora_B tensors", "check that it is a LoRA adapter")

    adapter = LoraAdapter(name=name, source=source or str(folder), config=config)
    dtypes = set()
    for module in sorted(pairs, key=_natural_key):
        AB = pairs[module]
        if set(AB) != {"A", "B"}:
            missing = "lora_B" if "B" not in AB else "lora_A"
            raise _fail(name, f"module {module} has no {missing} weight to pair with", "the weights file is incomplete")
        A, B = AB["A"], AB["B"]
        for side, t in (("lora_A", A), ("lora_B", B)):
            if not t.is_floating_point():
                raise _fail(name, f"{module}.{side} is {t.dtype}, not a float tensor (quantized?)", "dequantize the adapter first")
            if t.dim() != 2:
                raise _fail(name, f"{module}.{side} has shape {tuple(t.shape)}, not a matrix", "only linear LoRA layers are supported")
            if not torch.isfinite(t).all():
                raise _fail(name, f"{module}.{side} contains NaN or Inf values", "the adapter is broken: retrain or re-export it")
        if A.shape[0] != B.shape[1]:
            raise _fail(name, f"{module}: lora_A has {A.shape[0]} rows but lora_B has {B.shape[1]} columns", "the weights do not pair up")
        r, scaling = module_scaling(config, module)
        if A.shape[0] != r:
            raise _fail(name, f"{module}: weights have rank {A.shape[0]} but the config says r={r}",
                        "fix r / rank_pattern in adapter_config.json")
        dtypes.add(A.dtype)
        work = torch.float64 if A.dtype == torch.float64 else torch.float32
        adapter.modules[module] = LoraModule(A=A.to(work), B=B.to(work) * scaling, scaling=scaling)
    adapter.dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return adapter


def _natural_key(s: str) -> list:
    """Sort 'layers.10' after 'layers.9' (the seeds' code scrambled order past 10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
