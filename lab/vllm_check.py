"""Exports as vLLM's own code reads them: each module's rank and scale from vLLM's PEFTHelper, against the file.

vLLM is not in the pinned set (a GPU wheel of 336 MB that wants transformers 5), so this runs against an unpacked
wheel beside its few import-time dependencies, set up once:

    pip download vllm==0.33.0 --no-deps -d /tmp/vllmw && (cd /tmp/vllmw && unzip -q vllm-*.whl 'vllm/*')
    pip install --target /tmp/vdeps "transformers>=5" cbor2 pyzmq openai_harmony
    .venv/bin/python -m lab.vllm_check OUT_FOLDER --vllm /tmp/vllmw --deps /tmp/vdeps

It reads every export folder in OUT_FOLDER and prints how many modules vLLM would run at a rank other than its
tensors' or a scale other than 1.0 (what soppu-hub writes: alpha = rank for every module); exit 1 if any.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from soppu_hub.peft_format.layout import CONFIG_NAME, KEY_PREFIX, SAFETENSORS_NAME, vllm_max_lora_rank


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.vllm_check", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="a compress --out folder (its adapter folders are checked)")
    p.add_argument("--vllm", type=Path, required=True, help="folder holding the unpacked vllm package")
    p.add_argument("--deps", type=Path, required=True, help="folder holding its import-time dependencies")
    args = p.parse_args(argv)
    sys.path[:0] = [str(args.vllm), str(args.deps)]
    from safetensors import safe_open
    from vllm import __version__ as version
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    folders = sorted(d for d in args.out.iterdir() if (d / CONFIG_NAME).exists())
    modules = wrong = 0
    for d in folders:
        helper = PEFTHelper.from_local_dir(str(d), max_position_embeddings=None)
        top = max([helper.r, *helper.rank_pattern.values()])
        helper.validate_legal(LoRAConfig(max_lora_rank=vllm_max_lora_rank(top)))  # the card's --max-lora-rank
        with safe_open(str(d / SAFETENSORS_NAME), "pt") as f:
            for key in f.keys():
                if not key.endswith(".lora_A.weight"):
                    continue
                name = key.removeprefix(KEY_PREFIX).removesuffix(".lora_A.weight")
                rank, scale = helper.get_rank_and_scaling(name)
                modules += 1
                if rank != f.get_slice(key).get_shape()[0] or abs(scale - 1.0) > 1e-12:
                    wrong += 1
                    print(f"{d.name}: {name}: vLLM reads rank {rank}, scale {scale}")
    print(f"vLLM {version} PEFTHelper: {len(folders)} exports, {modules} modules, {wrong} read otherwise than written")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
