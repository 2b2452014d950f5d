"""What a pushed adapter repo looks like to servers: file names, key prefix, the ranks they run, their ids.

Defined once here so the reader, the exporter, the card, the Hub code and the backend agree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
CARD_NAME = "README.md"
REPORT_NAME = "report.json"
KEY_PREFIX = "base_model.model."

# The bundle slice lives in a subfolder: LoRAX loads every top-level *.safetensors as adapter weights.
TAG = "soppu"  # the Hub tag every pushed repo carries: how the Space and --author find (or skip) them
BUNDLE_DIR = "soppu"
BUNDLE_WEIGHTS = "bundle.safetensors"
BUNDLE_HEADER = "bundle.json"
# Beside the adapters' folders in an --out folder: the whole fit's bundle, or the collection that holds its bases.
COLLECTION_DIR = "collection"

# The id LoRAX's API (and so the CLI, the Space and the embedded backend) gives "no adapter, the base model".
BASE_MODEL_ID = "__base_model__"

PLOTS_DIR = "plots"
ERRORS_PNG = f"{PLOTS_DIR}/errors_by_layer.png"
RANKS_PNG = f"{PLOTS_DIR}/ranks_by_layer.png"
PARAMS_PNG = f"{PLOTS_DIR}/params.png"
AGREEMENT_PNG = f"{PLOTS_DIR}/agreement_by_rank.png"

# LoRAX (server/lorax_server/utils/punica.py): SGMV pads r to 8 * tensor-parallel size, or above that to
# the next multiple of 16, then overwrites config.r with the padded rank while scaling by lora_alpha / r.
LORAX_MIN_RANK = 8
LORAX_BLOCK = 16
# Tensor-parallel sizes (--num-shard) considered: LoRAX shards a base only where its attention heads and KV heads
# divide evenly, so which sizes run depends on the base (SmolLM2-135M's 9 heads / 3 KV heads: 1 and 3).
LORAX_MAX_TP = 8
# --lorax-tp auto pads for the largest size up to this one the base allows (2 where it shards to 2: exact at 1 and
# 2 as before; 1 where it does not, so nothing is padded for a size LoRAX refuses); unknown base: this one.
DEFAULT_LORAX_TP = 2
LORAX_AUTO = "auto"
# vLLM accepts only these values for --max-lora-rank (default 16).
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def lorax_rank(rank: int, tensor_parallel: int = 1) -> int:
    """The rank LoRAX's SGMV kernels pad an adapter of rank `rank` to (LoRAX's own rule)."""
    floor = LORAX_MIN_RANK * tensor_parallel
    return floor if rank <= floor else -(-rank // LORAX_BLOCK) * LORAX_BLOCK


def lorax_exact_tps(r: int, ranks: Iterable[int] = (), sizes: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The tensor-parallel sizes (of `sizes`, default 1 .. LORAX_MAX_TP) at which LoRAX runs an adapter unchanged
    (so at its full strength): config r = `r`, its modules' tensors of ranks `ranks` (default: all r).

    LoRAX ignores rank_pattern / alpha_pattern, scales every module type by lora_alpha / config.r and overwrites
    config.r with the padded rank of each type it loads (and stacks a type's layers, which must pad alike): exact
    where every module's rank pads to r itself."""
    ranks = set(ranks) or {r}
    return tuple(tp for tp in sizes or range(1, LORAX_MAX_TP + 1) if {lorax_rank(k, tp) for k in ranks} == {r})


def lorax_module_rank(rank: int, r: int, sizes: Iterable[int]) -> int:
    """The smallest rank >= `rank` that LoRAX pads to `r` at every size of `sizes`: what a module that needs
    `rank` is written at in an export of config r (zeros only where its own rank would pad elsewhere)."""
    return next(w for w in range(rank, r + 1) if all(lorax_rank(w, tp) == r for tp in sizes))


def lorax_shard_sizes(model_config: dict | None) -> tuple[int, ...] | None:
    """The --num-shard sizes LoRAX can start a base with (its attention heads and KV heads divisible, up to
    LORAX_MAX_TP), from the base's config.json; None when the config names no head count (not checked)."""
    cfg = model_config or {}
    cfg = cfg.get("text_config") or cfg  # multimodal configs keep the language model's heads there
    heads = next((cfg[k] for k in ("num_attention_heads", "n_head", "num_heads") if isinstance(cfg.get(k), int)), None)
    if not heads:
        return None
    kv = cfg.get("num_key_value_heads") or (1 if cfg.get("multi_query") else heads)
    return tuple(tp for tp in range(1, LORAX_MAX_TP + 1) if heads % tp == 0 and kv % tp == 0)


def vllm_max_lora_rank(rank: int) -> int | None:
    """Smallest `--max-lora-rank` vLLM accepts that serves rank `rank`; None when vLLM cannot serve it."""
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)


def pattern_key(name: str) -> str:
    """A module's rank_pattern / alpha_pattern key: its name less the first part. PEFT before 0.15 matched keys as
    `.*\\.key$` (a suffix after a "."), PEFT since and vLLM as `(.*\\.)?key$`: this form matches in all three."""
    return name.split(".", 1)[1] if "." in name else name


def rank_pattern(written: dict[str, int], r: int) -> dict[str, int] | None:
    """rank_pattern for modules written at `written` under config r (also the alpha_pattern: alpha = rank, scale 1),
    one key per pattern_key; None when some key would also match a module of another rank (first match wins)."""
    pattern = {pattern_key(m): w for m, w in sorted(written.items()) if w != r}
    for m, w in written.items():
        hits = {v for k, v in pattern.items() if m == k or m.endswith("." + k)}
        if hits - {w} or (w != r and not hits):
            return None
    return pattern


def written_ranks(needed: dict[str, int], r: int, sizes: Iterable[int]) -> dict[str, int] | None:
    """The rank each module is written at under config r: the least that LoRAX pads to r at every size of `sizes`
    (lorax_module_rank), made alike where one tensor or one key holds several modules (the experts of a MoE layer,
    which vLLM stacks; names that differ only in their first part, which share a pattern_key), and r for a name
    without a "." (old PEFT cannot key it). None when no rank_pattern can say them."""
    sizes = tuple(sizes)
    written = {m: lorax_module_rank(max(1, k), r, sizes) if "." in m else r for m, k in needed.items()}
    groups = (lambda m: re.sub(r"\.experts\.\d+\.", ".experts.*.", m), pattern_key)
    while True:
        before = dict(written)
        for group in groups:
            top: dict[str, int] = {}
            for m, w in written.items():
                top[group(m)] = max(w, top.get(group(m), 0))
            written = {m: top[group(m)] for m in written}
        if written == before:
            return written if rank_pattern(written, r) is not None else None
