"""adapter_config.json as PEFT's own LoraConfig writes it, without importing PEFT for plain configs.

`import peft` pulls in transformers (5-7 s on two cores), the whole of a `soppu-hub join`'s budget. PEFT's
LoraConfig is still the judge: `lora_config.json` beside this file is PEFT's field list and defaults,
written by PEFT itself (`python -m soppu_hub.peft_format.config`; a test fails when it no longer matches the
installed PEFT). A config whose every non-default field is a plain one (rank, alpha, target modules, dropout,
bias, ...) with a value of the type PEFT takes is completed from those defaults here; anything else, and any
installed PEFT other than the recorded one, goes through LoraConfig itself. Tests compare both paths on
every config they can find.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib.metadata
import json
import warnings
from collections.abc import Callable
from pathlib import Path

SNAPSHOT = Path(__file__).with_name("lora_config.json")
_NOT_INPUT = {"peft_version", "runtime_config"}  # set by PEFT, never taken from a file
_BIASES = {"none", "all", "lora_only"}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _strs(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _opt_str(v) -> bool:
    return v is None or isinstance(v, str)


def _patterns(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and _number(x) for k, x in v.items())


# The fields a plain config may set, each with the values PEFT's LoraConfig takes without a word.
_PLAIN: dict[str, Callable[[object], bool]] = {
    "base_model_name_or_path": _opt_str,
    "revision": _opt_str,
    "inference_mode": lambda v: isinstance(v, bool),
    "r": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "lora_alpha": _number,
    "lora_dropout": _number,
    "target_modules": lambda v: v is None or isinstance(v, str) or _strs(v),
    "exclude_modules": lambda v: v is None or isinstance(v, str) or _strs(v),
    "fan_in_fan_out": lambda v: isinstance(v, bool),
    "bias": lambda v: v in _BIASES,
    "use_rslora": lambda v: isinstance(v, bool),
    "use_dora": lambda v: v is False,
    "lora_bias": lambda v: isinstance(v, bool),
    "modules_to_save": lambda v: v is None or _strs(v),
    "init_lora_weights": lambda v: isinstance(v, bool) or v == "gaussian",
    "layers_to_transform": lambda v: (
        v is None
        or (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v))
    ),
    "layers_pattern": lambda v: v is None or isinstance(v, str) or _strs(v),
    "rank_pattern": _patterns,
    "alpha_pattern": _patterns,
    "auto_mapping": lambda v: v is None or isinstance(v, dict),
}


def _normal(value):
    """A config value as JSON holds it: sets sorted, enums by value."""
    if isinstance(value, set):
        return sorted(value)
    return value.value if isinstance(value, enum.Enum) else value


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # 0 is not false, 8 is not 8.0


def peft_snapshot() -> dict:
    """What PEFT's LoraConfig is: its version, input fields with defaults, task types. Imports PEFT."""
    from peft import LoraConfig, TaskType

    defaults = _with_peft({})
    fields = sorted(f.name for f in dataclasses.fields(LoraConfig) if f.name not in _NOT_INPUT)
    return {
        "peft_version": importlib.metadata.version("peft"),
        "fields": fields,
        "defaults": defaults,
        "task_types": sorted(t.value for t in TaskType),
    }


@functools.lru_cache(maxsize=1)
def _snapshot() -> dict | None:
    """The recorded snapshot when it describes the installed PEFT, else None (then PEFT decides)."""
    try:
        snap = json.loads(SNAPSHOT.read_text())
        installed = importlib.metadata.version("peft")
    except (OSError, ValueError, importlib.metadata.PackageNotFoundError):
        return None
    return snap if snap.get("peft_version") == installed else None


def plain_config(config: dict, **overrides) -> dict | None:
    """The config PEFT would write, from the snapshot; None when the config is not plain (ask PEFT)."""
    snap = _snapshot()
    if snap is None:
        return None
    known = set(snap["fields"])
    kept = {k: v for k, v in config.items() if k in known}
    kept.update(overrides)
    defaults = snap["defaults"]
    for key, value in kept.items():
        if _same(value, defaults[key]):
            continue
        if key == "task_type":
            if value is not None and value not in snap["task_types"]:
                return None
        elif key not in _PLAIN or not _PLAIN[key](value):
            return None
    out = {**defaults, **kept}
    if isinstance(out["target_modules"], str) and (
        out["layers_to_transform"] is not None or out["layers_pattern"] is not None
    ):
        return None  # PEFT refuses these together
    if out["layers_pattern"] and out["layers_to_transform"] is None:
        return None
    if out["lora_bias"] and out["init_lora_weights"] not in (True, False):
        return None
    for key in ("target_modules", "exclude_modules"):  # PEFT keeps these as sets
        if isinstance(out[key], list):
            out[key] = sorted(set(out[key]))
    return out


def _with_peft(kept: dict) -> dict:
    from peft import LoraConfig  # slow import: only for configs that are not plain

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = LoraConfig(**kept).to_dict()
    out.pop("runtime_config", None)
    return {k: _normal(v) for k, v in out.items()}


def clean_config(config: dict, **overrides) -> dict:
    """adapter_config.json as PEFT's own LoraConfig writes it: keys PEFT no longer knows (enable_lora,
    merge_weights...) are dropped, every kept field is valid for PEFT. Raises ValueError / TypeError."""
    fast = plain_config(config, **overrides)
    if fast is not None:
        return fast
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)} - _NOT_INPUT
    kept = {k: v for k, v in config.items() if k in known}
    kept.update(overrides)
    return _with_peft(kept)


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(peft_snapshot(), indent=1) + "\n")  # defaults in PEFT's field order
    print(f"wrote {SNAPSHOT}")
