"""Read a PEFT LoRA adapter folder into factors with PEFT's scaling folded in, and refuse what JD can't take.

What JD does not compress travels unchanged: `modules_to_save` copies (classification heads, embed_tokens,
lm_head), saved `base_layer` weights and trainable-token deltas are kept as `carried` tensors under their
own keys; a `lora_B.bias` (PEFT's lora_bias) stays with its module, scaled like B.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import AdapterError

from .layout import BIN_NAME, CONFIG_NAME, KEY_PREFIX, SAFETENSORS_NAME

# lora_A / lora_B weights of a linear layer, lora_B's bias (lora_bias), the factors of an embedding layer.
# PEFT strips the adapter name when saving; very old files may still hold it, hence the optional segment.
_KEY_RE = re.compile(
    r"^(?P<module>.+)\.(?:lora_(?P<side>[AB])(?:\.[^.]+)?\.weight|lora_B(?:\.[^.]+)?\.(?P<bias>bias)"
    r"|lora_embedding_(?P<eside>[AB])(?:\.[^.]+)?)$"
)
LINEAR, EMBEDDING = "linear", "embedding"
DTYPE_ORDER = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class LoraModule:
    """One adapted linear layer: delta W = B @ A (out x in), with the PEFT scaling already in B."""

    A: torch.Tensor  # (k, in_features); for an embedding (k, num_embeddings)
    B: torch.Tensor  # (out_features, k), scaling folded in; for an embedding (embedding_dim, k)
    scaling: float
    kind: str = LINEAR  # "embedding": PEFT's lora_embedding_A / _B, delta applied to the transposed weight
    bias: torch.Tensor | None = None  # lora_B.bias (lora_bias=True), scaling folded in

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
    carried: dict[str, torch.Tensor] = field(default_factory=dict)  # full key -> tensor, copied as is
    dtype: torch.dtype = torch.float32

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def lora_params(self) -> int:
        """Parameters JD compresses: the A and B factors."""
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())

    @property
    def carried_params(self) -> int:
        """Parameters copied unchanged into the export: carried tensors and lora_B biases."""
        biases = sum(m.bias.numel() for m in self.modules.values() if m.bias is not None)
        return sum(t.numel() for t in self.carried.values()) + biases

    @property
    def carried_names(self) -> list[str]:
        """Keys of everything this adapter carries, biases included, in a stable order."""
        biases = [f"{KEY_PREFIX}{n}.lora_B.bias" for n, m in self.modules.items() if m.bias is not None]
        return sorted([*self.carried, *biases])

    @property
    def num_params(self) -> int:
        return self.lora_params + self.carried_params

    def extras(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """What the export writes beside the factors: carried tensors as they are, lora_B biases in `dtype`."""
        biases = {f"{KEY_PREFIX}{n}.lora_B.bias": m.bias.to(dtype) for n, m in self.modules.items() if m.bias is not None}
        return {**self.carried, **biases}

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
    if config.get("target_parameters"):
        raise _fail(name, f"it uses target_parameters ({', '.join(map(str, config['target_parameters']))}), LoRA on raw "
                    "parameters such as MoE experts; only LoRA on modules (target_modules) is compressed",
                    "compress adapters trained with target_modules only")
    if not isinstance(config.get("r"), int) or config["r"] < 1 or "lora_alpha" not in config:
        raise _fail(name, f"{CONFIG_NAME} lacks a valid 'r' or 'lora_alpha'", "re-save the adapter with PEFT")
    return config


def clean_config(config: dict, **overrides) -> dict:
    """adapter_config.json as PEFT's own LoraConfig writes it: keys PEFT no longer knows (enable_lora,
    merge_weights...) are dropped, every kept field is validated by PEFT. Raises ValueError / TypeError."""
    from peft import LoraConfig  # slow import, only when a config is written or checked

    known = {f.name for f in dataclasses.fields(LoraConfig)} - {"peft_version", "runtime_config"}
    kept = {k: v for k, v in config.items() if k in known}
    kept.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = LoraConfig(**kept).to_dict()
    out.pop("runtime_config", None)
    return {k: sorted(v) if isinstance(v, set) else (v.value if isinstance(v, enum.Enum) else v) for k, v in out.items()}


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
    try:
        clean_config(config)
    except (ValueError, TypeError) as e:
        raise _fail(name, f"PEFT rejects its {CONFIG_NAME} ({str(e).splitlines()[0]})", "re-save the adapter with a current PEFT") from None
    tensors = _load_tensors(folder, name)

    parts: dict[str, dict[str, torch.Tensor]] = {}
    carried: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if "lora_magnitude_vector" in key:
            raise _fail(name, f"tensor {key} is a DoRA magnitude vector", "compress a plain LoRA adapter instead")
        match = _KEY_RE.match(key)
        if match is None:
            if ".lora_" in key:
                raise _fail(name, f"tensor {key} is not a LoRA factor this tool knows", "compress a plain PEFT LoRA adapter")
            carried[key] = tensor  # modules_to_save copy, saved base_layer weight, trainable-token delta
            continue
        module = match["module"].removeprefix(KEY_PREFIX)
        part = f"E{match['eside']}" if match["eside"] else (match["bias"] or match["side"])
        parts.setdefault(module, {})[part] = tensor
    if not any(set(p) - {"bias"} for p in parts.values()):
        raise _fail(name, "the weights file holds no lora_A / lora_B tensors", "check that it is a LoRA adapter")

    adapter = LoraAdapter(name=name, source=source or str(folder), config=config, carried=carried)
    dtypes = set()
    for module in sorted(parts, key=_natural_key):
        got = parts[module]
        kind = EMBEDDING if {"EA", "EB"} & set(got) else LINEAR
        a_key, b_key = ("EA", "EB") if kind == EMBEDDING else ("A", "B")
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if kind == EMBEDDING else ("lora_A", "lora_B")
        if a_key not in got or b_key not in got:
            missing = b_name if b_key not in got else a_name
            raise _fail(name, f"module {module} has no {missing} weight to pair with", "the weights file is incomplete")
        A, B = got[a_key], got[b_key]
        for side, t in ((a_name, A), (b_name, B)):
            if not t.is_floating_point():
                raise _fail(name, f"{module}.{side} is {t.dtype}, not a float tensor (quantized?)", "dequantize the adapter first")
            if t.dim() != 2:
                raise _fail(name, f"{module}.{side} has shape {tuple(t.shape)}, not a matrix", "only linear and embedding LoRA layers are supported")
            if not torch.isfinite(t).all():
                raise _fail(name, f"{module}.{side} contains NaN or Inf values", "the adapter is broken: retrain or re-export it")
        if A.shape[0] != B.shape[1]:
            raise _fail(name, f"{module}: {a_name} has {A.shape[0]} rows but {b_name} has {B.shape[1]} columns", "the weights do not pair up")
        r, scaling = module_scaling(config, module)
        if A.shape[0] != r:
            raise _fail(name, f"{module}: weights have rank {A.shape[0]} but the config says r={r}",
                        "fix r / rank_pattern in adapter_config.json")
        dtypes.update((A.dtype, B.dtype))
        work = torch.float64 if A.dtype == torch.float64 else torch.float32
        bias = got.get("bias")
        adapter.modules[module] = LoraModule(
            A=A.to(work), B=B.to(work) * scaling, scaling=scaling, kind=kind,
            bias=None if bias is None else bias.to(work) * scaling,
        )
    adapter.dtype = widest_dtype(dtypes)
    return adapter


def widest_dtype(dtypes) -> torch.dtype:
    """One dtype that holds all of `dtypes` exactly: itself if they agree; bf16 with fp16 needs float32."""
    dtypes = set(dtypes)
    if len(dtypes) == 1:
        return dtypes.pop()
    return max(dtypes | {torch.float32}, key=DTYPE_ORDER.index)


def _natural_key(s: str) -> list:
    """Sort 'layers.10' after 'layers.9' (the seeds' code scrambled order past 10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
