"""Read a PEFT LoRA adapter folder into factors with PEFT's scaling folded in, and refuse what JD can't take.

What JD does not compress travels unchanged: `modules_to_save` copies (classification heads, embed_tokens,
lm_head), saved `base_layer` weights and trainable-token deltas are kept as `carried` tensors under their
own keys; a `lora_B.bias` (PEFT's lora_bias) stays with its module, scaled like B.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import clean_config
from .folder import load_weights, module_scaling, read_config, refusal
from .layout import CONFIG_NAME, KEY_PREFIX, SAFETENSORS_NAME

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

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A), B scaled: delta = B @ A, the order every factor pair has in this project."""
        return self.B, self.A


_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


@dataclass
class StreamedModule:
    """A module whose factors stay in the safetensors file until asked for, so that a thousand adapters are
    read one module position at a time (compress stacks one position across all adapters, then drops it).
    Header facts (rank, shape, dtype) are known without reading the data; NaN / Inf is found on load."""

    path: Path
    adapter: str
    module: str
    keys: tuple[str, str, str | None]  # A, B, bias (None without lora_bias)
    rank: int
    shape: tuple[int, int]
    scaling: float
    kind: str = LINEAR
    checked: bool = field(default=False, repr=False, compare=False)  # NaN / Inf looked for on the first read only

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) read from the file now, B scaled, in float32 (float64 stays float64)."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            A, B = f.get_tensor(self.keys[0]), f.get_tensor(self.keys[1])
        for side, t in (("A", A), ("B", B)) if not self.checked else ():
            if not torch.isfinite(t).all():
                raise refusal(
                    self.adapter,
                    f"{self.module} lora_{side} contains NaN or Inf values",
                    "the adapter is broken: retrain or re-export it",
                )
        self.checked = True
        work = torch.float64 if A.dtype == torch.float64 else torch.float32
        return B.to(work) * self.scaling, A.to(work)

    @property
    def A(self) -> torch.Tensor:
        return self.factors()[1]

    @property
    def B(self) -> torch.Tensor:
        return self.factors()[0]

    @property
    def bias(self) -> torch.Tensor | None:
        if self.keys[2] is None:
            return None
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            t = f.get_tensor(self.keys[2])
        return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32) * self.scaling


@dataclass
class LoraAdapter:
    """A LoRA adapter as JD sees it; `config` is the original adapter_config.json."""

    name: str
    source: str
    config: dict
    modules: dict[str, LoraModule | StreamedModule] = field(default_factory=dict)
    carried: dict[str, torch.Tensor] = field(default_factory=dict)  # full key -> tensor, copied as is
    dtype: torch.dtype = torch.float32

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def lora_params(self) -> int:
        """Parameters JD compresses: the A and B factors."""
        return sum(m.rank * (m.shape[0] + m.shape[1]) for m in self.modules.values())

    def _has_bias(self, m) -> bool:
        return m.keys[2] is not None if isinstance(m, StreamedModule) else m.bias is not None

    @property
    def carried_params(self) -> int:
        """Parameters copied unchanged into the export: carried tensors and lora_B biases."""
        biases = sum(m.shape[0] for m in self.modules.values() if self._has_bias(m))
        return sum(t.numel() for t in self.carried.values()) + biases

    @property
    def carried_names(self) -> list[str]:
        """Keys of everything this adapter carries, biases included, in a stable order."""
        biases = [f"{KEY_PREFIX}{n}.lora_B.bias" for n, m in self.modules.items() if self._has_bias(m)]
        return sorted([*self.carried, *biases])

    @property
    def num_params(self) -> int:
        return self.lora_params + self.carried_params

    def extras(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """What the export writes beside the factors: carried tensors as they are, lora_B biases in `dtype`."""
        biases = {
            f"{KEY_PREFIX}{n}.lora_B.bias": m.bias.to(dtype) for n, m in self.modules.items() if self._has_bias(m)
        }
        return {**self.carried, **biases}


def read_adapter(
    folder: str | Path, *, name: str | None = None, source: str | None = None, stream: bool = False
) -> LoraAdapter:
    """Read a PEFT LoRA folder. Factors become float32 (float64 stays float64): exact for bf16/fp16.

    With `stream` (and a safetensors file) only the header is read: every check that needs no data (keys,
    pairs, shapes, dtypes, ranks) runs now, the factors load when compress asks for their module position."""
    folder = Path(folder)
    name = name or folder.name
    config = read_config(folder, name)
    try:
        clean_config(config)
    except (ValueError, TypeError) as e:
        raise refusal(
            name,
            f"PEFT rejects its {CONFIG_NAME} ({str(e).splitlines()[0]})",
            "re-save the adapter with a current PEFT",
        ) from None
    if stream and (folder / SAFETENSORS_NAME).is_file():
        return _read_header(folder, name, source, config)
    tensors = load_weights(folder, name)

    parts, carried_keys = _classify(name, tensors)
    carried = {k: tensors[k] for k in carried_keys}  # modules_to_save copies, saved base_layer weights, token deltas
    adapter = LoraAdapter(name=name, source=source or str(folder), config=config, carried=carried)
    dtypes = set()
    for module, (kind, (A, B), scaling, _) in _checked_modules(name, config, parts):
        for side, t in (("A", A), ("B", B)):
            if not torch.isfinite(t).all():
                side = f"lora_embedding_{side}" if kind == EMBEDDING else f"lora_{side}"
                raise refusal(
                    name,
                    f"{module}.{side} contains NaN or Inf values",
                    "the adapter is broken: retrain or re-export it",
                )
        dtypes.update((A.dtype, B.dtype))
        work = torch.float64 if A.dtype == torch.float64 else torch.float32
        bias = parts[module].get("bias")
        adapter.modules[module] = LoraModule(
            A=A.to(work),
            B=B.to(work) * scaling,
            scaling=scaling,
            kind=kind,
            bias=None if bias is None else bias.to(work) * scaling,
        )
    adapter.dtype = widest_dtype(dtypes)
    return adapter


class _Meta:
    """What a safetensors header says about one tensor, shaped like the tensor for the shared checks."""

    def __init__(self, shape: list[int], dtype: str) -> None:
        self.shape, self.st_dtype = torch.Size(shape), dtype
        self.dtype = _ST_DTYPES.get(dtype, torch.int8)

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self.st_dtype in _ST_DTYPES


def _read_header(folder: Path, name: str, source: str | None, config: dict) -> LoraAdapter:
    from safetensors import SafetensorError, safe_open

    path = folder / SAFETENSORS_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            metas = {k: (k, _Meta(f.get_slice(k).get_shape(), f.get_slice(k).get_dtype())) for k in f.keys()}
            parts, carried_keys = _classify(name, metas)
            carried = {k: f.get_tensor(k) for k in carried_keys}
    except (SafetensorError, OSError, ValueError) as e:
        raise refusal(
            name, f"{SAFETENSORS_NAME} is corrupt ({str(e).splitlines()[0]})", "download or save it again"
        ) from None
    adapter = LoraAdapter(name=name, source=source or str(folder), config=config, carried=carried)
    dtypes = set()
    for module, got in _checked_modules(
        name, config, {m: {p: meta for p, (_, meta) in g.items()} for m, g in parts.items()}
    ):
        kind, (A, B), scaling, rank = got
        a_part, b_part = ("EA", "EB") if kind == EMBEDDING else ("A", "B")
        bias = parts[module].get("bias")
        adapter.modules[module] = StreamedModule(
            path,
            name,
            module,
            (parts[module][a_part][0], parts[module][b_part][0], bias[0] if bias else None),
            rank,
            (B.shape[0], A.shape[1]),
            scaling,
            kind,
        )
        dtypes.update((A.dtype, B.dtype))
    adapter.dtype = widest_dtype(dtypes)
    return adapter


def _classify(name: str, items: dict) -> tuple[dict[str, dict], list[str]]:
    """Sort a weights file's keys: module -> {"A", "B", "bias", "EA", "EB"} -> value, and the carried keys.
    Refuses DoRA magnitude vectors and lora_* tensors this tool does not know."""
    parts: dict[str, dict] = {}
    carried: list[str] = []
    for key, value in items.items():
        if "lora_magnitude_vector" in key:
            raise refusal(name, f"tensor {key} is a DoRA magnitude vector", "compress a plain LoRA adapter instead")
        match = _KEY_RE.match(key)
        if match is None:
            if ".lora_" in key:
                raise refusal(
                    name, f"tensor {key} is not a LoRA factor this tool knows", "compress a plain PEFT LoRA adapter"
                )
            carried.append(key)
            continue
        module = match["module"].removeprefix(KEY_PREFIX)
        part = f"E{match['eside']}" if match["eside"] else (match["bias"] or match["side"])
        parts.setdefault(module, {})[part] = value
    return parts, carried


def _checked_modules(name: str, config: dict, parts: dict[str, dict]):
    """Pair, check and scale each module's factors (tensors or header entries): yields
    (module, (kind, (A, B), scaling, rank)) in natural order. Data checks (NaN / Inf) are the caller's."""
    if not any(set(p) - {"bias"} for p in parts.values()):
        raise refusal(name, "the weights file holds no lora_A / lora_B tensors", "check that it is a LoRA adapter")
    for module in sorted(parts, key=_natural_key):
        got = parts[module]
        kind = EMBEDDING if {"EA", "EB"} & set(got) else LINEAR
        a_key, b_key = ("EA", "EB") if kind == EMBEDDING else ("A", "B")
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if kind == EMBEDDING else ("lora_A", "lora_B")
        if a_key not in got or b_key not in got:
            missing = b_name if b_key not in got else a_name
            raise refusal(
                name, f"module {module} has no {missing} weight to pair with", "the weights file is incomplete"
            )
        A, B = got[a_key], got[b_key]
        for side, t in ((a_name, A), (b_name, B)):
            if not t.is_floating_point():
                raise refusal(
                    name,
                    f"{module}.{side} is {t.dtype}, not a float tensor (quantized?)",
                    "dequantize the adapter first",
                )
            if t.dim() != 2:
                raise refusal(
                    name,
                    f"{module}.{side} has shape {tuple(t.shape)}, not a matrix",
                    "only linear and embedding LoRA layers are supported",
                )
        if A.shape[0] != B.shape[1]:
            raise refusal(
                name,
                f"{module}: {a_name} has {A.shape[0]} rows but {b_name} has {B.shape[1]} columns",
                "the weights do not pair up",
            )
        r, scaling = module_scaling(config, module)
        if A.shape[0] != r:
            raise refusal(
                name,
                f"{module}: weights have rank {A.shape[0]} but the config says r={r}",
                "fix r / rank_pattern in adapter_config.json",
            )
        yield module, (kind, (A, B), scaling, r)


def widest_dtype(dtypes) -> torch.dtype:
    """One dtype that holds all of `dtypes` exactly: itself if they agree; bf16 with fp16 needs float32."""
    dtypes = set(dtypes)
    if len(dtypes) == 1:
        return dtypes.pop()
    return max(dtypes | {torch.float32}, key=DTYPE_ORDER.index)


def _natural_key(s: str) -> list:
    """Sort 'layers.10' after 'layers.9' (the seeds' code scrambled order past 10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
