"""Exports through LoRAX's own adapter loader on the CPU: the delta LoRAX would apply per module, against PEFT's.

LoRAX's server runs only on CUDA, so this imports its Python source (a checkout of predibase/lorax, `server/`) with
its GPU kernels stubbed out (the punica module is stubbed as present, so its SGMV rank padding applies, as on a GPU
with LoRAX's image) and drives the code a load runs: `load_module_map` (its source, its PEFT config read),
then `LoraConfig.load_batched_adapter_weights` for each layer type in Llama's order, with one config object as a
server keeps it. Setup, once (LoRAX pins peft 0.4.0):

    git clone https://github.com/predibase/lorax /tmp/lorax-src
    pip install --target /tmp/ldeps loguru boto3 && pip install --no-deps --target /tmp/ldeps peft==0.4.0
    .venv/bin/python -m lab.lorax_check OUT_FOLDER --lorax /tmp/lorax-src/server --deps /tmp/ldeps --num-shard 1

Prints, per export, the strength LoRAX runs it at (the ratio of LoRAX's delta to PEFT's, over all modules); exit 1
if any export that the report calls exact at that size is not (or the other way round).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
from pathlib import Path

from soppu_hub.peft_format.folder import module_scaling
from soppu_hub.peft_format.layout import CONFIG_NAME, KEY_PREFIX, REPORT_NAME, SAFETENSORS_NAME

LLAMA_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # flash_llama's order
KERNELS = ("bgmv_expand", "bgmv_expand_slice", "bgmv_shrink", "sgmv_expand", "sgmv_expand_slice", "sgmv_shrink")


class _Stub(types.ModuleType):
    """A module whose every name is a do-nothing class: generated protobufs and GPU kernels."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *a, **k: None})


def _import_lorax(src: Path, deps: Path):
    sys.path[:0] = [str(src), str(deps)]
    for name in [m for m in sys.modules if m == "peft" or m.startswith("peft.")]:
        del sys.modules[name]  # LoRAX reads configs with its own pinned PEFT
    for name in ("punica_kernels", "lorax_server.pb.generate_pb2", *(f"lorax_server.utils.ops.{k}" for k in KERNELS)):
        sys.modules[name] = _Stub(name)
    from lorax_server.adapters.lora import LoraConfig  # noqa: F401  (registers the adapter type)
    from lorax_server.utils.adapter import load_module_map
    from lorax_server.utils.punica import has_sgmv

    assert has_sgmv(), "LoRAX's SGMV path is off: check that punica_kernels is stubbed"
    return load_module_map


def peft_deltas(folder: Path) -> dict:
    """Module -> the delta PEFT applies (scale B A, rank_pattern / alpha_pattern by PEFT's own rule)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / CONFIG_NAME).read_text())
    t = load_file(str(folder / SAFETENSORS_NAME))
    names = [k.removeprefix(KEY_PREFIX).removesuffix(".lora_A.weight") for k in t if k.endswith(".lora_A.weight")]
    return {
        n: module_scaling(cfg, n)[1]
        * t[f"{KEY_PREFIX}{n}.lora_B.weight"].double()
        @ t[f"{KEY_PREFIX}{n}.lora_A.weight"].double()
        for n in names
    }


def lorax_strengths(folder: Path, wants: dict, num_shard: int, load_module_map) -> list[float]:
    """Per module (in load order), LoRAX's applied delta over PEFT's (`wants`, from peft_deltas): 1.0 is exact."""
    import torch

    cfg = json.loads((folder / CONFIG_NAME).read_text())
    names = sorted(wants, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)])
    by_type = {t: [n for n in names if n.rsplit(".", 1)[-1] == t] for t in LLAMA_TYPES}
    module_map, config, _, _ = load_module_map(
        cfg.get("base_model_name_or_path"), str(folder), "local", tuple(names), None, lazy_load_weights=False
    )
    layer = types.SimpleNamespace(base_layer=types.SimpleNamespace(linear=types.SimpleNamespace(weight=torch.zeros(1))))
    out = []
    for kind, members in by_type.items():
        if not members:
            continue
        count = len(members)
        model = types.SimpleNamespace(
            get_num_layers_for_type=lambda _t, n=count: n,
            target_to_layer={(i, kind): (name, layer) for i, name in enumerate(members)},
            dtype=torch.float32,
            world_size=num_shard,
            shard_lora_weights=lambda a, b, _t: (a, b),  # the scale and padding are what a shard count changes
        )
        weights = config.load_batched_adapter_weights(model, module_map, kind, set(), False)
        for i, name in enumerate(members):
            a, b = weights.weights_a[i].double(), weights.weights_b[i].double()
            a = a if a.shape[1] == b.shape[0] else a.T  # LoRAX stores A as (in, r) or, for 16..128, (r, in)
            got, want = (a @ b).T, wants[name]
            out.append(float((got * want).sum() / (want * want).sum()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.lorax_check", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="a compress --out folder (its adapter folders and report.json)")
    p.add_argument("--lorax", type=Path, required=True, help="LoRAX's server/ folder (a checkout)")
    p.add_argument("--deps", type=Path, required=True, help="folder holding loguru, boto3 and peft 0.4.0")
    p.add_argument("--num-shard", type=int, default=1, help="the LoRAX tensor-parallel size to load at")
    args = p.parse_args(argv)
    report = json.loads((args.out / REPORT_NAME).read_text())
    wants = {e["name"]: peft_deltas(args.out / e["name"]) for e in report["adapters"]}
    load_module_map = _import_lorax(args.lorax, args.deps)
    wrong = 0
    for entry in report["adapters"]:
        s = lorax_strengths(args.out / entry["name"], wants[entry["name"]], args.num_shard, load_module_map)
        exact = all(abs(x - 1.0) < 1e-6 for x in s)
        claimed = args.num_shard in entry["lorax_exact_tp"]
        wrong += exact != claimed
        print(f"{entry['name']}: {len(s)} modules, strength {min(s):.4f} to {max(s):.4f}, claimed exact: {claimed}")
    print(f"LoRAX loader at --num-shard {args.num_shard}: {len(report['adapters'])} exports, {wrong} not as claimed")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
