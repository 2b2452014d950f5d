"""Shared test helpers: reference computations through the real libraries."""

from pathlib import Path


def peft_loader(model):
    """`load(path, name)` as the backend gives SharedBases: the first call wraps `model` in a PeftModel, later ones
    add adapters to it; returns the PeftModel each time."""
    holder = {}

    def load(path, name):
        if "m" not in holder:
            from peft import PeftModel

            holder["m"] = PeftModel.from_pretrained(model, path, adapter_name=name).eval()
        else:
            holder["m"].load_adapter(path, adapter_name=name)
        return holder["m"]

    return load


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


def lorax_effective_scales(folder: Path, tensor_parallel: int = 1) -> dict:
    """Load an export the way LoRAX's SGMV path does and return module -> effective scale (1.0 = as compressed).

    LoRAX (server/lorax_server/adapters/lora.py, utils/punica.py) reads r and lora_alpha from the config and
    ignores rank_pattern / alpha_pattern; it goes through the target module types in turn; for each it scales
    every layer's lora_B by lora_alpha / config.r (or / sqrt(r) with rsLoRA), pads each tensor's rank to 8 * tp or
    the next multiple of 16, stacks the type's layers (so their padded ranks must agree: an AssertionError here,
    a load failure there) and then overwrites config.r with the first layer's padded rank, which the next module
    type (and any later load of the cached config) is scaled with. The intended scale is PEFT's, per module
    (rank_pattern / alpha_pattern honoured).
    """
    import json
    import math
    import re

    from safetensors.torch import load_file

    from soppu_hub.peft_format.folder import module_scaling

    cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
    tensors = load_file(str(Path(folder) / "adapter_model.safetensors"))
    alpha, rslora = cfg["lora_alpha"], cfg.get("use_rslora", False)
    natural = lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]  # noqa: E731
    modules = sorted({k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}, key=natural)
    by_type: dict[str, list[str]] = {}
    for m in modules:
        by_type.setdefault(m.rsplit(".", 1)[-1], []).append(m)
    r = cfg["r"]  # the cached config object LoRAX mutates
    out = {}
    for kind, names in by_type.items():
        scale = alpha / (math.sqrt(r) if rslora else r)
        floor = 8 * tensor_parallel
        padded = []
        for m in names:
            rank = tensors[m + ".lora_A.weight"].shape[0]
            padded.append(floor if rank <= floor else (rank + 15) // 16 * 16)
            name = m.removeprefix("base_model.model.")
            out[name] = scale / module_scaling(cfg, name)[1]
        assert len(set(padded)) == 1, f"LoRAX cannot stack {kind}: its layers pad to ranks {sorted(set(padded))}"
        r = padded[0]
    return out


def random_peft_adapter(
    root: Path,
    build,
    lora_kwargs: dict,
    name: str,
    seed: int,
    *,
    scale: float = 0.2,
    also=None,
    dtype=None,
    save_kwargs: dict | None = None,
):
    """A tiny base (built by `build()`, saved once as root/base) and a PEFT LoRA on it, saved as root/name.

    Every trainable tensor is randomised (and any parameter `also(name)` selects), so that what the adapter
    carries is not zeros; with `dtype` the values are rounded to it and the file is saved in it, as published
    half-precision adapters are. Returns (peft model, adapter folder, base folder).
    """
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    base_dir = Path(root) / "base"
    if not base_dir.exists():
        torch.manual_seed(0)
        build().save_pretrained(base_dir)
    base = type(build()).from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.requires_grad or (also is not None and also(pname)):
                p.add_(scale * torch.randn(p.shape, generator=g))
                if dtype is not None:
                    p.copy_(p.to(dtype).float())
    folder = Path(root) / name
    model.save_pretrained(folder, **(save_kwargs or {}))
    if dtype is not None and dtype != torch.float32:
        f = folder / "adapter_model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(str(f)).items()}, str(f))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return model.eval(), folder, base_dir


def peft_clean(config: dict, **overrides) -> dict:
    """adapter_config.json as PEFT's LoraConfig itself makes it (no fast path): what clean_config must equal."""
    import dataclasses

    from peft import LoraConfig

    from soppu_hub.peft_format.config import _with_peft

    known = {f.name for f in dataclasses.fields(LoraConfig)} - {"peft_version", "runtime_config"}
    return _with_peft({**{k: v for k, v in config.items() if k in known}, **overrides})


def compress_local(sources: list, out, *extra) -> int:
    """`soppu-hub compress SOURCES --out OUT` kept local, quiet, on the CPU, plus `extra` flags: its exit code."""
    from soppu_hub.cli import main

    return main(
        ["compress", *map(str, sources), "--out", str(out), "--no-push", "--quiet", "--device", "cpu", *map(str, extra)]
    )


def join_local(source, collection, out, *extra) -> int:
    """`soppu-hub join SOURCE --collection COLLECTION --no-push --out OUT --quiet` plus `extra`: its exit code."""
    from soppu_hub.cli import main

    return main(
        [
            "join",
            str(source),
            "--collection",
            str(collection),
            "--no-push",
            "--out",
            str(out),
            "--quiet",
            *map(str, extra),
        ]
    )


def report_from(body: dict):
    """A typed Report from a partial report.json body (what the test leaves out is 0, "", [] or None): tests of the
    cards and plots state only the numbers they are about."""
    from dataclasses import fields

    from soppu_hub.compression.report import AdapterReport, Report

    def filled(cls, given: dict) -> dict:
        empty = {"int": 0, "float": 0.0, "str": ""}
        out = {}
        for f in fields(cls):
            kind = str(f.type)
            default = (
                None
                if "None" in kind
                else []
                if kind.startswith("list")
                else {}
                if kind.startswith("dict")
                else empty.get(kind)
            )
            out[f.name] = given.get(f.name, default)
        return out

    top = filled(Report, body)
    top["adapters"] = [AdapterReport(**filled(AdapterReport, a)) for a in body.get("adapters", [])]
    return Report(**top)


def chat_cli(*args, typed: str = ""):
    """`soppu-hub chat ARGS` as a person runs it, `typed` as what they type (lines): the finished process."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "soppu_hub", "chat", *map(str, args)],
        input=typed,
        capture_output=True,
        text=True,
        timeout=120,
    )
