"""Reading PEFT adapters: scaling exactly as PEFT applies it, dtypes, and every refusal."""

import json
import math

import pytest
import torch
from helpers import peft_deltas
from safetensors.torch import save_file

from lab.samples import llama_module_shapes, synthetic_factors, write_adapter
from soppu_hub.errors import AdapterError
from soppu_hub.peft_format.read import read_adapter


def _facs(rank=4, seed=0, n=1):
    return synthetic_factors(llama_module_shapes(), n, rank, shared=0, seed=seed)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"use_rslora": True},
        {"alpha_pattern": {"v_proj": 32}, "lora_alpha": 5},
        {"use_rslora": True, "alpha_pattern": {"model.layers.1.mlp.down_proj": 3}},
    ],
    ids=["plain", "rslora", "alpha_pattern", "rslora+alpha_pattern"],
)
def test_scaling_matches_peft(tmp_path, tiny_base, extra):
    config = {"lora_alpha": 16, **extra}
    folder = write_adapter(
        tmp_path / "a", _facs()[0], base_model=str(tiny_base), rank=4, alpha=config.pop("lora_alpha"), **config
    )
    ours = read_adapter(folder)
    ref = peft_deltas(tiny_base, folder)
    assert set(ref) == set(ours.modules) and len(ref) == 14
    for name, mod in ours.modules.items():
        torch.testing.assert_close(mod.B @ mod.A, ref[name], atol=1e-6, rtol=1e-5)


def test_rank_pattern_matches_peft(tmp_path, tiny_base):
    shapes = llama_module_shapes()
    g = torch.Generator().manual_seed(1)
    facs = {}
    for name, (m, d) in shapes.items():
        k = 2 if name.endswith("q_proj") else 6
        facs[name] = (torch.randn(m, k, generator=g), torch.randn(k, d, generator=g))
    folder = write_adapter(
        tmp_path / "rp",
        facs,
        base_model=str(tiny_base),
        rank=6,
        alpha=12,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"q_proj": 8},
    )
    ours = read_adapter(folder)
    assert ours.modules["model.layers.0.self_attn.q_proj"].rank == 2
    assert ours.modules["model.layers.0.self_attn.q_proj"].scaling == 4.0
    ref = peft_deltas(tiny_base, folder)
    for name, mod in ours.modules.items():
        torch.testing.assert_close(mod.B @ mod.A, ref[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_any_float_dtype_read_without_loss(tmp_path, dtype):
    facs = _facs()[0]
    folder = write_adapter(tmp_path / "d", facs, base_model="x", rank=4, alpha=4, dtype=dtype)
    ours = read_adapter(folder)
    assert ours.dtype == dtype
    for name, (B, A) in facs.items():
        assert torch.equal(ours.modules[name].A, A.to(dtype).float())
        assert torch.equal(ours.modules[name].B, B.to(dtype).float())


def test_legacy_bin_weights(tmp_path):
    folder = write_adapter(tmp_path / "b", _facs()[0], base_model="x", rank=4, alpha=8)
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "adapter_model.safetensors")), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    ours = read_adapter(folder)
    assert len(ours.modules) == 14 and ours.modules["model.layers.0.self_attn.q_proj"].scaling == 2.0


def test_natural_module_order(tmp_path):
    facs = synthetic_factors(llama_module_shapes(layers=12, targets=("q_proj",)), 1, 2, shared=0)[0]
    ours = read_adapter(write_adapter(tmp_path / "n", facs, base_model="x", rank=2, alpha=2))
    assert list(ours.modules) == [f"model.layers.{i}.self_attn.q_proj" for i in range(12)]


def _good(tmp_path, name="bad"):
    return write_adapter(tmp_path / name, _facs()[0], base_model="x", rank=4, alpha=8)


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder, fn):
    from safetensors.torch import load_file

    t = load_file(str(folder / "adapter_model.safetensors"))
    fn(t)
    save_file(t, str(folder / "adapter_model.safetensors"))


def _huge_header(path) -> None:
    """A header declaring a 100 GB lora_A (8 bytes of data behind it): refused, never allocated."""
    import json
    import struct

    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    header = json.dumps({name: {"dtype": "F32", "shape": [100_000, 262_144], "data_offsets": [0, 104_857_600_000]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 8)


REFUSALS = {
    "not_lora": (lambda f: _edit_config(f, peft_type="PREFIX_TUNING"), "not 'LORA'"),
    "dora": (lambda f: _edit_config(f, use_dora=True), "DoRA"),
    "no_config": (lambda f: (f / "adapter_config.json").unlink(), "no adapter_config.json"),
    "bad_json": (lambda f: (f / "adapter_config.json").write_text("{nope"), "not valid JSON"),
    "no_weights": (lambda f: (f / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    "corrupt": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x10\x00garbage"), "corrupt"),
    "100GB_header": (lambda f: _huge_header(f / "adapter_model.safetensors"), "corrupt"),
    "truncated": (
        lambda f: (f / "adapter_model.safetensors").write_bytes((f / "adapter_model.safetensors").read_bytes()[:-100]),
        "corrupt",
    ),
    "nan": (
        lambda f: _edit_tensors(
            f, lambda t: t["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"].__setitem__((0, 0), math.nan)
        ),
        "NaN or Inf",
    ),
    "inf": (
        lambda f: _edit_tensors(
            f,
            lambda t: t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].__setitem__((1, 1), math.inf),
        ),
        "NaN or Inf",
    ),
    "unpaired": (
        lambda f: _edit_tensors(f, lambda t: t.pop("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight")),
        "no lora_B",
    ),
    "rank_mismatch": (lambda f: _edit_config(f, r=8), "config says r=8"),
    "quantized": (
        lambda f: _edit_tensors(
            f,
            lambda t: t.__setitem__(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", torch.zeros(4, 64, dtype=torch.int8)
            ),
        ),
        "not a float tensor",
    ),
    "target_parameters": (
        lambda f: _edit_config(f, target_parameters=["mlp.experts.gate_up_proj"]),
        "only LoRA on modules",
    ),
    "unknown_lora_tensor": (
        lambda f: _edit_tensors(
            f, lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.up_proj.lora_E", torch.zeros(4, 1))
        ),
        "not a LoRA factor",
    ),
    "dora_tensor": (
        lambda f: _edit_tensors(
            f,
            lambda t: t.__setitem__(
                "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector", torch.ones(128)
            ),
        ),
        "DoRA",
    ),
    "peft_rejects_config": (lambda f: _edit_config(f, layers_pattern="layers"), "PEFT rejects"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_adapter_and_the_fix(tmp_path, case):
    folder = _good(tmp_path, f"adapter-{case}")
    breaker, expected = REFUSALS[case]
    breaker(folder)
    with pytest.raises(AdapterError) as err:
        read_adapter(folder)
    msg = str(err.value)
    assert msg.startswith(f"adapter-{case}: ") and expected in msg and ";" in msg and "\n" not in msg
