"""Exports servers run exactly as compressed: LoRAX's rank padding, dtypes, card commands, clean configs."""

import json

import pytest
import torch
from helpers import lorax_effective_scales
from safetensors import safe_open
from safetensors.torch import load_file

from lab.samples import llama_module_shapes, synthetic_factors, write_adapter
from soppu_hub.cli import main
from soppu_hub.compression.bundle import load_bundle
from soppu_hub.peft_format.layout import lorax_rank, vllm_max_lora_rank
from soppu_hub.peft_format.read import read_adapter


def _adapters(tmp_path, n=2, rank=8, dtypes=None, targets=("q_proj", "v_proj", "down_proj"), **extra):
    facs = synthetic_factors(llama_module_shapes(targets=targets), n, rank, shared=rank // 2, seed=5)
    dtypes = dtypes or [torch.float32] * n
    return [
        write_adapter(tmp_path / f"ad{i}", f, base_model="x", rank=rank, alpha=2 * rank, dtype=d, **extra)
        for i, (f, d) in enumerate(zip(facs, dtypes))
    ]


def _compress(srcs, out, *args):
    assert main(["compress", *map(str, srcs), "--out", str(out), "--quiet", "--no-push", *args]) == 0
    return json.loads((out / "report.json").read_text())


def test_rank_rules():
    assert [lorax_rank(r) for r in (1, 7, 8, 9, 12, 16, 17, 20, 33)] == [8, 8, 8, 16, 16, 16, 32, 32, 48]
    assert [lorax_rank(r, 2) for r in (7, 8, 12, 16, 17, 20)] == [16, 16, 16, 16, 32, 32]
    assert [lorax_rank(r, 4) for r in (8, 20, 32, 33)] == [32, 32, 32, 48]
    assert [vllm_max_lora_rank(r) for r in (1, 8, 9, 20, 48, 300, 512, 513)] == [8, 8, 16, 32, 64, 320, 512, None]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("rank", [7, 12, 20])
def test_lorax_serves_exports_at_full_strength(tmp_path, rank, tp):
    """JD-Diag exports at --rank: 7, 12 and 20 are ranks LoRAX would pad and then scale wrong."""
    srcs = _adapters(tmp_path, n=3)  # 3 x rank 8 spans 24 directions: room for a shared rank of 20
    padded = _compress(srcs, tmp_path / "pad", "--method", "diag", "--rank", str(rank), "--lorax-tp", str(tp))
    bare = _compress(srcs, tmp_path / "bare", "--method", "diag", "--rank", str(rank), "--no-pad")
    for entry in padded["adapters"]:
        folder = tmp_path / "pad" / entry["name"]
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert (
            cfg["r"] == cfg["lora_alpha"] == entry["export_rank"] == lorax_rank(rank, tp)
            and entry["unpadded_rank"] == rank
        )
        scales = lorax_effective_scales(folder, tp)
        assert len(scales) == 6 and all(s == pytest.approx(1.0, abs=1e-12) for s in scales.values())
        # the bare export is what LoRAX got wrong: every module type after the first is scaled r / padded
        bare_scales = lorax_effective_scales(tmp_path / "bare" / entry["name"], tp)
        assert sorted(set(round(s, 6) for s in bare_scales.values())) == sorted(
            {1.0, round(rank / lorax_rank(rank, tp), 6)}
        )
        # padding is zero columns / rows: the delta is the unpadded one bit for bit
        got, plain = (
            load_file(str(folder / "adapter_model.safetensors")),
            load_file(str(tmp_path / "bare" / entry["name"] / "adapter_model.safetensors")),
        )
        for key, t in got.items():
            if key.endswith("lora_A.weight"):
                assert torch.equal(t[:rank], plain[key]) and not t[rank:].any()
            else:
                assert torch.equal(t[:, :rank], plain[key]) and not t[:, rank:].any()
        pad_zeros = sum(t.numel() - plain[k].numel() for k, t in got.items())
        assert entry["padding_params"] == pad_zeros
        assert entry["export_params"] == sum(t.numel() for t in got.values())
    # padding is not compression: params_after counts the bundle either way
    assert padded["params_after"] == bare["params_after"]


B16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize(
    "dtypes, flag, want, store",
    [
        ([B16] * 2, [], [B16] * 2, B16),
        ([F16] * 2, [], [F16] * 2, F16),
        ([F32] * 2, [], [F32] * 2, F32),
        ([B16, F16], [], [B16, F16], B16),  # each export in its own input's dtype; a mixed set's store bf16
        ([B16, F32], [], [B16, F32], B16),
        ([B16] * 2, ["--export-dtype", "float32"], [F32] * 2, B16),  # the store follows the inputs, not the export
        ([F32] * 2, ["--export-dtype", "bf16"], [B16] * 2, F32),
        ([F32] * 2, ["--store-dtype", "fp16"], [F32] * 2, F16),
    ],
    ids=["bf16", "fp16", "fp32", "bf16+fp16", "bf16+fp32", "bf16->fp32", "fp32->bf16", "store-fp16"],
)
def test_export_dtype_and_errors_measured_on_what_was_written(tmp_path, dtypes, flag, want, store):
    srcs = _adapters(tmp_path, dtypes=dtypes)
    out = tmp_path / "out"
    report = _compress(srcs, out, "--rank", "6", *flag)
    names = sorted({str(w).removeprefix("torch.") for w in want})
    assert (
        report["export"]["dtype"] == (names[0] if len(names) == 1 else "mixed") and report["export"]["dtypes"] == names
    )
    with safe_open(str(out / "bundle" / "bundle.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {store}
    assert report["store_bytes"] == report["params_after"] * store.itemsize
    for src, entry, w in zip(srcs, report["adapters"], want):
        written = load_file(str(out / entry["name"] / "adapter_model.safetensors"))
        assert {t.dtype for t in written.values()} == {w} and entry["export_dtype"] == str(w).removeprefix("torch.")
        assert entry["export_bytes"] == sum(t.numel() * t.element_size() for t in written.values())
        assert entry["repo_bytes"] == sum(p.stat().st_size for p in (out / entry["name"]).rglob("*.safetensors"))
        orig = read_adapter(src)
        assert entry["bytes_before"] == orig.num_params * orig.dtype.itemsize
        for module, mod in orig.modules.items():
            W = mod.B.double() @ mod.A.double()
            B = written[f"base_model.model.{module}.lora_B.weight"].double()
            A = written[f"base_model.model.{module}.lora_A.weight"].double()
            dense = ((W - B @ A).norm() / W.norm()).item()
            assert entry["modules"][module]["rel_error"] == pytest.approx(dense, rel=1e-6, abs=1e-9)


def test_bf16_export_is_half_the_size_of_fp32(tmp_path):
    srcs = _adapters(tmp_path, dtypes=[torch.bfloat16] * 2)
    _compress(srcs, tmp_path / "auto", "--rank", "6")
    _compress(srcs, tmp_path / "fp32", "--rank", "6", "--export-dtype", "float32")
    size = lambda d: (tmp_path / d / "ad0" / "adapter_model.safetensors").stat().st_size  # noqa: E731
    assert size("auto") < 0.55 * size("fp32")


@pytest.mark.parametrize("rank", [4, 8])
def test_default_export_is_exact_in_lorax_at_tensor_parallel_1_and_2(tmp_path, rank):
    """A rank-8 export padded for tp 1 ran at half strength under LoRAX's --num-shard 2 on every module type after
    the first: where the base's heads cannot be read, auto pads for 2, exact at both, and the card says so."""
    srcs = _adapters(tmp_path, rank=rank)
    report = _compress(srcs, tmp_path / "out", "--rank", str(rank))
    for entry in report["adapters"]:
        assert entry["export_rank"] == 16 and entry["lorax_exact_tp"] == [1, 2]
        for tp in (1, 2):
            scales = lorax_effective_scales(tmp_path / "out" / entry["name"], tp)
            assert len(scales) == 6 and all(s == pytest.approx(1.0, abs=1e-12) for s in scales.values()), (tp, scales)
        assert lorax_effective_scales(tmp_path / "out" / entry["name"], 4) != {k: 1.0 for k in scales}  # 4: not exact
        text, _ = _card(tmp_path / "out", entry["name"])
        assert (
            "| LoRAX tensor parallel | the base model's head counts could not be read, so the sizes LoRAX runs it "
            "at were not checked; this export is exact at 1, 2 (padded for 2) |"
        ) in text
    assert report["export"]["lorax_sizes"] is None and report["export"]["lorax_tp"] == 2
    bare = _compress(srcs, tmp_path / "bare", "--rank", str(rank), "--no-pad", "--method", "diag")
    assert bare["adapters"][0]["lorax_exact_tp"] == ([1] if rank == 8 else [])


def test_lorax_tp_auto_reads_the_base_and_pads_only_for_sizes_lorax_runs(tmp_path, capsys):
    """SmolLM2-135M has 9 attention heads and 3 KV heads: LoRAX refuses 2 and 4 shards and runs 1 and 3. Padding a
    rank-8 export to 16 for 2 shards bought nothing there (issue 35): auto pads for 1; --lorax-tp 3 is exact at 3
    (LoRAX's loader emulated); --lorax-tp 2 is refused in one line naming the sizes the base allows."""
    base = tmp_path / "base-9-heads"
    base.mkdir()
    (base / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576})
    )
    srcs = _adapters(tmp_path, rank=8)
    auto = _compress(srcs, tmp_path / "auto", "--rank", "8", "--base-model", str(base))
    assert auto["export"]["lorax_sizes"] == [1, 3] and auto["export"]["lorax_tp"] == 1
    for entry in auto["adapters"]:
        assert entry["export_rank"] == 8 and entry["padding_params"] == 0 and entry["lorax_exact_tp"] == [1]
        assert set(lorax_effective_scales(tmp_path / "auto" / entry["name"], 1).values()) == {1.0}
        text, _ = _card(tmp_path / "auto", entry["name"])
        assert (
            "| LoRAX tensor parallel | LoRAX runs the base at `--num-shard` 1, 3; this export is exact at 1 (padded "
            "for 1); at 3 LoRAX pads the rank and serves it too weak: re-export with `--lorax-tp 3` |"
        ) in text
    three = _compress(srcs, tmp_path / "three", "--rank", "8", "--base-model", str(base), "--lorax-tp", "3")
    for entry in three["adapters"]:
        assert entry["export_rank"] == 24 and entry["lorax_exact_tp"] == [3]
        scales = lorax_effective_scales(tmp_path / "three" / entry["name"], 3)
        assert all(v == pytest.approx(1.0, abs=1e-12) for v in scales.values())
        assert any(
            v != pytest.approx(1.0) for v in lorax_effective_scales(tmp_path / "three" / entry["name"], 1).values()
        )
    capsys.readouterr()
    assert (
        main(
            [
                "compress",
                *map(str, srcs),
                "--out",
                str(tmp_path / "two"),
                "--quiet",
                "--no-push",
                "--rank",
                "8",
                "--base-model",
                str(base),
                "--lorax-tp",
                "2",
            ]
        )
        != 0
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lorax-tp 2: LoRAX cannot shard" in err[0] and "the sizes it allows: 1, 3" in err[0]
    assert not (tmp_path / "two").exists()


def _card(out, name):
    text = (out / name / "README.md").read_text()
    meta = text.split("---")[1]
    return text, meta


@pytest.mark.parametrize(
    "rank, pad, vllm", [(20, True, 32), (20, False, 32), (12, False, 16), (7, False, 8), (7, True, 16)]
)
def test_card_vllm_command_has_a_rank_vllm_accepts(tmp_path, rank, pad, vllm):
    srcs = _adapters(tmp_path, n=3)
    out = tmp_path / "out"
    report = _compress(srcs, out, "--method", "diag", "--rank", str(rank), *([] if pad else ["--no-pad"]))
    text, _ = _card(out, "ad0")
    r = report["adapters"][0]["export_rank"]
    assert (
        f"--enable-lora --max-lora-rank {vllm} " in text and vllm >= r and vllm in (8, 16, 32, 64, 128, 256, 320, 512)
    )


def test_local_card_snippets_load_the_folder_and_license(tmp_path):
    srcs = _adapters(tmp_path)
    (srcs[0] / "README.md").write_text("---\nlicense: apache-2.0\n---\n# my adapter\n")
    out = tmp_path / "out"
    _compress(srcs, out, "--rank", "6")
    text, meta = _card(out, "ad0")
    path = str((out / "ad0").resolve())
    assert (
        '"adapter_source": "local"' in text
        and f'"adapter_id": "{path}"' in text
        and '"adapter_source": "hub"' not in text
    )
    assert f"--lora-modules ad0={path}" in text
    assert (
        f"soppu-hub serve --model x --adapter-dir {out.resolve()}" in text
        and f"soppu-hub chat {path} --adapter-source local" in text
    )
    assert "license: apache-2.0" in meta
    _, meta1 = _card(out, "ad1")
    assert "license: unknown" in meta1


def test_exported_config_is_peft_s_own_without_obsolete_keys(tmp_path):
    srcs = _adapters(tmp_path, task_type="CAUSAL_LM", revision="v1.0", enable_lora=None, merge_weights=False)
    out = tmp_path / "out"
    _compress(srcs, out, "--rank", "6")
    cfg = json.loads((out / "ad0" / "adapter_config.json").read_text())
    assert "enable_lora" not in cfg and "merge_weights" not in cfg
    assert cfg["base_model_name_or_path"] == "x" and cfg["task_type"] == "CAUSAL_LM" and cfg["revision"] == "v1.0"
    from peft import LoraConfig

    loaded = LoraConfig.from_pretrained(str(out / "ad0"))
    assert (
        loaded.r == 16
        and loaded.lora_alpha == 16
        and not loaded.use_rslora
        and set(loaded.target_modules) == {"q_proj", "v_proj", "down_proj"}
    )


def test_bundle_written_in_export_dtype_reconstructs(tmp_path):
    srcs = _adapters(tmp_path, dtypes=[torch.bfloat16] * 2)
    out = tmp_path / "out"
    _compress(srcs, out, "--rank", "16")
    bundle = load_bundle(out / "ad0" / "soppu")
    orig = read_adapter(srcs[0])
    for module, (B, A) in bundle.factors(0).items():
        W = orig.modules[module].B @ orig.modules[module].A
        assert ((W - B.float() @ A.float()).norm() / W.norm()) < 0.02  # bf16 rounding only, at lossless rank


def test_each_module_is_written_at_its_own_rank():
    """Issue 35: zeros only where LoRAX's padding would otherwise differ between modules (ExportConfig.ranks_for):
    config r is LoRAX's padded rank, each module the least rank that LoRAX pads to r at every size r is exact at."""
    from soppu_hub.compression.export import ExportConfig

    one = ExportConfig(lorax_tp=1, lorax_sizes=(1, 3))
    q, v, q1 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"
    assert one.ranks_for({q: 3, v: 5, q1: 0}) == (8, {q: 3, v: 5, q1: 1})
    # auto on a base whose heads are unknown pads for 2: exact at 1 and 2 needs every module past LoRAX's 8
    assert ExportConfig().ranks_for({q: 3, v: 12}) == (16, {q: 9, v: 12})
    four = ExportConfig(lorax_tp=4, lorax_sizes=(1, 2, 4))
    assert four.ranks_for({q: 3, v: 20}) == (32, {q: 17, v: 20})  # 17..32 pad to 32 at 1, 2, 4
    three = ExportConfig(lorax_tp=3, lorax_sizes=(1, 3))
    assert three.ranks_for({q: 3, v: 20}) == (24, {q: 3, v: 20})  # r = 24 is exact at 3 only
    assert ExportConfig(pad=False).ranks_for({q: 3, v: 5}) == (5, {q: 3, v: 5})
    assert ExportConfig(uniform=True).ranks_for({q: 3, v: 5}) == (16, {q: 16, v: 16})
    # T5's encoder and decoder modules share a key (the name less its first part): written alike
    enc, dec = "encoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.0.SelfAttention.q"
    assert one.ranks_for({enc: 2, dec: 4, v: 3}) == (8, {enc: 4, dec: 4, v: 3})
    # a name without a "." cannot be keyed for PEFT before 0.15: written at r
    assert one.ranks_for({"lm_head": 2, v: 3}) == (8, {"lm_head": 8, v: 3})
    # a key that would also match a module of another rank: one uniform rank instead
    assert one.ranks_for({"x.lm_head": 2, "x.y.lm_head": 5}) == (8, {"x.lm_head": 8, "x.y.lm_head": 8})
    # one MoE layer's experts alike (vLLM stacks them); other layers and modules free
    moe = {"m.layers.0.mlp.experts.0.w1": 2, "m.layers.0.mlp.experts.1.w1": 5, "m.layers.1.mlp.experts.0.w1": 1}
    assert one.ranks_for(moe)[1] == {**moe, "m.layers.0.mlp.experts.0.w1": 5}


def test_rank_pattern_keys_match_in_old_and_new_peft_and_vllm(tmp_path):
    """Each key is a module's name less its first part: PEFT up to 0.14 matched keys as `.*\\.key$`, PEFT since and
    vLLM as `(.*\\.)?key$` (first match wins); under both every module resolves to the rank of its tensors."""
    import re

    from peft.utils.other import get_pattern_key

    srcs = _adapters(tmp_path, rank=8)
    report = _compress(srcs, tmp_path / "out", "--rank", "3", "--lorax-tp", "1")
    for entry in report["adapters"]:
        folder = tmp_path / "out" / entry["name"]
        cfg = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        assert cfg["rank_pattern"] and all(not k.startswith("model.") for k in cfg["rank_pattern"])
        for key, A in tensors.items():
            if not key.endswith("lora_A.weight"):
                continue
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            old = next((k for k in cfg["rank_pattern"] if re.match(rf".*\.{k}$", name)), None)
            new = get_pattern_key(cfg["rank_pattern"].keys(), name)
            assert cfg["rank_pattern"].get(old, cfg["r"]) == cfg["rank_pattern"].get(new, cfg["r"]) == A.shape[0]


@pytest.mark.parametrize("arch", ["qwen3", "gpt2", "flan-t5", "mixtral-moe", "bert-cls"])
def test_per_module_ranks_load_exactly_in_peft_and_lorax(tmp_path, arch):
    """The per-module layout through PEFT's own loader (rank_pattern / alpha_pattern, the rule vLLM copies) on
    tiny models of several families: the same logits as the original, no zeros, exact in LoRAX at 1 shard."""
    from test_peft_format_models import _logits, _save

    (f0, base_dir, model_cls), (f1, _, _) = _save(tmp_path, arch, 1, torch.float32), _save(tmp_path, arch, 2, F32)
    out = tmp_path / "out"
    report = _compress([f0, f1], out, "--rank", "64", "--lorax-tp", "1")
    for folder, entry in zip((f0, f1), report["adapters"]):
        cfg = json.loads((out / entry["name"] / "adapter_config.json").read_text())
        assert cfg["r"] == cfg["lora_alpha"] == 8 and cfg["rank_pattern"] == cfg["alpha_pattern"]
        assert entry["padding_params"] == 0 and entry["lorax_exact_tp"][0] == 1
        assert entry["module_ranks"] == ([2, 4] if arch == "qwen3" else [4, 4])  # qwen3's v_proj: rank 2
        assert set(cfg["rank_pattern"].values()) == set(range(entry["module_ranks"][0], 5)) - {3}
        scales = lorax_effective_scales(out / entry["name"], 1)
        assert scales and all(s == pytest.approx(1.0, abs=1e-12) for s in scales.values())
        ref = _logits(model_cls, base_dir, folder)
        torch.testing.assert_close(_logits(model_cls, base_dir, out / entry["name"]), ref, atol=1e-4, rtol=1e-4)


def test_uniform_rank_writes_the_old_layout(tmp_path):
    """--uniform-rank: every module at config r, zero-padded, no patterns (for readers that need one shape); the
    default writes the same delta with fewer bytes."""
    srcs = _adapters(tmp_path, rank=4)
    uni = _compress(srcs, tmp_path / "uni", "--rank", "4", "--uniform-rank")
    own = _compress(srcs, tmp_path / "own", "--rank", "4")
    assert uni["export"]["layout"] == "uniform" and own["export"]["layout"] == "per-module"
    for u, o in zip(uni["adapters"], own["adapters"]):
        cfg = json.loads((tmp_path / "uni" / u["name"] / "adapter_config.json").read_text())
        assert cfg["r"] == 16 and not cfg["rank_pattern"] and not cfg["alpha_pattern"] and u["module_ranks"] == [16, 16]
        assert o["module_ranks"] == [9, 9] and o["export_bytes"] < u["export_bytes"]
        assert u["export_params"] - o["export_params"] == u["padding_params"] - o["padding_params"] > 0  # only zeros
        assert u["mean_rel_error"] == pytest.approx(o["mean_rel_error"], abs=1e-7)
        for folder in (tmp_path / "uni" / u["name"], tmp_path / "own" / o["name"]):
            assert set(lorax_effective_scales(folder, 1).values()) == {1.0}
