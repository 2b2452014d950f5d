"""The shared-basis store in bytes (issue 34): --store-dtype int8 / int4 / nf4, group-wise codes, cores refit to the
quantized bases, versioned files, exports written from what is stored, damage refused in one line."""

import json
import shutil

import pytest
import torch
from helpers import compress_local, join_local
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lab.samples import family_factors, llama_module_shapes, write_adapter
from soppu_hub.cli import main
from soppu_hub.compression.bundle import Bundle, FactoredCore, ModuleBasis, load_bundle
from soppu_hub.compression.quantize import QUANTIZED, Store, bits_per_number, dequantize, pack, quantize, unpack
from soppu_hub.compression.store import choose_store, stored_bundle, stored_core
from soppu_hub.errors import BundleError, CollectionError
from soppu_hub.peft_format.read import read_adapter

SHAPES = llama_module_shapes(hidden=64, layers=2, targets=("q_proj", "v_proj"))
LIMIT = {"int8": 0.01, "int4": 0.13, "nf4": 0.11}  # relative error of one orthonormal basis, groups of 64


@pytest.mark.parametrize("kind", QUANTIZED)
def test_codes_round_trip_within_their_precision_and_again_to_the_same_codes(kind):
    torch.manual_seed(0)
    U = torch.linalg.qr(torch.randn(576, 32))[0]
    q = quantize(U, kind)
    back = dequantize(q, kind)
    err = ((back - U).norm() / U.norm()).item()
    assert 0 < err < LIMIT[kind]
    assert torch.equal(quantize(back, kind).codes, q.codes)  # a store is written from its de-quantized values
    blobs, index = pack({"U": U}, kind, whole=("U",))
    size = sum(t.numel() * t.element_size() for t in blobs.values())
    assert size == U.numel() * bits_per_number(kind) / 8 + 4  # the codes, the fp16 scales, the slice's maximum
    # a stack is quantized item by item: one member's core gets the codes the collection's stack gave it
    cores = torch.randn(5, 16, 13) * torch.logspace(0, -4, 16)[:, None]  # rows of very different sizes
    stack = dequantize(quantize(cores, kind, items=5), kind)
    assert torch.equal(dequantize(quantize(cores[2:3], kind), kind)[0], stack[2])
    assert torch.equal(unpack(*pack({"c": cores, "U": U}, kind, whole=("U",)))["c"], stack)
    empty = unpack(*pack({"U": U[:, :0], "c": cores[:, :0]}, kind, whole=("U",)))  # shared rank 0: private only
    assert empty["U"].shape == (576, 0) and empty["c"].shape == (5, 0, 13)


def _bundle(seed=0, r=8, n=3):
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name, (out, inp) in SHAPES.items():
        U, V = (
            torch.linalg.qr(torch.randn(out, r, generator=g))[0],
            torch.linalg.qr(torch.randn(inp, r, generator=g))[0],
        )
        cores = {i: torch.randn(r, r, generator=g) for i in range(n - 1)}
        cores[n - 1] = FactoredCore(torch.randn(r, 2, generator=g), torch.randn(2, r, generator=g))
        mods[name] = ModuleBasis(U, V, cores)
    cfg = {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    return Bundle("full", [f"a{i}" for i in range(n)], [cfg] * n, mods)


@pytest.mark.parametrize("kind", QUANTIZED)
def test_cores_refit_to_the_quantized_bases_lose_less_than_quantizing_alone(kind):
    b, store = _bundle(), Store(kind)
    q = stored_bundle(b, store)
    refit = naive = 0.0
    for name, mb in b.modules.items():
        qm = q.modules[name]
        assert isinstance(qm.cores[2], FactoredCore)  # a factored core stays factored
        for i, c in mb.cores.items():
            W = mb.U @ mb.core_matrix(i) @ mb.V.T
            alone = stored_core(c, store)
            alone = alone.matrix() if isinstance(alone, FactoredCore) else alone
            refit += ((qm.U @ qm.core_matrix(i) @ qm.V.T - W).norm() ** 2 / W.norm() ** 2).item()
            naive += ((qm.U @ alone @ qm.V.T - W).norm() ** 2 / W.norm() ** 2).item()
    assert refit < naive * 0.98  # the part of the bases' error inside their span comes back


def test_auto_store_keeps_the_inputs_dtype_when_they_agree_else_bf16():
    f32, b16, f16 = torch.float32, torch.bfloat16, torch.float16
    assert choose_store("auto", [f32, f32]).dtype == f32 and choose_store("auto", [b16]).dtype == b16
    assert choose_store("auto", [f16, f16]).dtype == f16 and choose_store("auto", [torch.float64]).dtype == f32
    assert choose_store("auto", [b16, f32]).dtype == b16 and choose_store("auto", [b16, f16]).dtype == b16
    assert choose_store("nf4", [f32]).quantized and choose_store("fp16", [f32]).dtype == f16


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    facs, _ = family_factors(SHAPES, 6, 4, families=2, noise=0.02, seed=3)
    return root, [
        write_adapter(root / "in" / f"a{i}", f, base_model="tiny", rank=4, alpha=8) for i, f in enumerate(facs)
    ]


def _compress(srcs, out, *args):
    assert compress_local([*map(str, srcs)], str(out), "--rank", "8", *args) == 0
    return json.loads((out / "report.json").read_text())


def test_a_quantized_store_is_smaller_in_bytes_and_every_export_is_what_it_stores(family):
    root, srcs = family
    reports = {k: _compress(srcs, root / k, "--store-dtype", k) for k in ("bf16", "int8", "nf4", "int4")}
    size = {k: sum(p.stat().st_size for p in (root / k / "bundle").rglob("*.safetensors")) for k in reports}
    assert size["bf16"] / size["int8"] > 1.7 and size["bf16"] / size["nf4"] > 3.0 and size["nf4"] == size["int4"]
    fit = [a["fit_mean_rel_error"] for a in reports["bf16"]["adapters"]]
    for k, report in reports.items():
        assert report["store"]["dtype"] == k.replace("bf16", "bfloat16")
        assert report["store_bytes"] == pytest.approx(
            report["params_after"] * Store("bfloat16" if k == "bf16" else k).bytes_per_number, rel=1e-6
        )
        header = json.loads((root / k / "bundle" / "bundle.json").read_text())
        assert header["version"] == (5 if k != "bf16" else 2) and header.get("store") == Store(k).header()
        bundle = load_bundle(root / k / "bundle")
        for i, a in enumerate(report["adapters"]):
            assert a["fit_mean_rel_error"] == pytest.approx(fit[i], rel=1e-6)  # the same fit; only the store differs
            assert a["mean_rel_error"] >= a["fit_mean_rel_error"] - 1e-3
            peft = load_file(str(root / k / a["name"] / "adapter_model.safetensors"))
            for name, (B, A) in bundle.factors(i).items():
                got = peft[f"base_model.model.{name}.lora_B.weight"] @ peft[f"base_model.model.{name}.lora_A.weight"]
                want = (B @ A).float()  # exported from what is stored (bf16: up to the rounding of both sides)
                assert (got - want).norm() <= (1e-2 if k == "bf16" else 1e-5) * want.norm()
            plain = read_adapter(root / k / a["name"])  # what LoRAX, vLLM and PEFT read: a standard LoRA, no codes
            assert plain.modules.keys() == bundle.factors(i).keys() and plain.dtype == torch.float32
    means = {k: sum(a["mean_rel_error"] for a in r["adapters"]) / len(r["adapters"]) for k, r in reports.items()}
    assert means["int8"] < means["bf16"] + 0.005 < means["nf4"] + 0.005 and means["nf4"] < 0.2


def test_a_quantized_collection_keeps_bases_and_cores_as_codes_and_joiners_follow_it(family, tmp_path):
    from soppu_hub.collection.format import read_collection
    from soppu_hub.collection.publish import member_bases

    root, srcs = family
    out = tmp_path / "out"
    _compress(srcs[:4], out, "--store-dtype", "int8", "--collection", "alice/q-coll")
    body = json.loads((out / "collection" / "collection.json").read_text())
    assert body["version"] == 3 and body["store"] == {"dtype": "int8", "group": 64}
    assert read_collection(out / "collection").stored == Store("int8")
    bases = load_file(str(out / "collection" / "clusters" / "cluster-0.safetensors"))
    assert bases.keys() == {"q.codes", "q.scales", "q.maxima"}
    member = load_bundle(out / "a0" / "soppu", bases=member_bases(out / "a0"))
    assert json.loads((out / "a0" / "soppu" / "bundle.json").read_text())["version"] == 5
    assert join_local(srcs[4], out / "collection", tmp_path / "j") == 0
    joined = load_file(str(tmp_path / "j" / "soppu" / "bundle.safetensors"))
    assert joined.keys() == {"q.codes", "q.scales", "q.maxima"}
    assert member.modules  # loads with its collection's bases


def test_damaged_or_newer_stores_are_one_line_errors(family, tmp_path):
    root, srcs = family
    out = tmp_path / "out"
    _compress(srcs[:4], out, "--store-dtype", "nf4", "--collection", "alice/q-coll")
    from soppu_hub.collection.format import read_collection
    from soppu_hub.collection.remote import open_collection

    path = out / "collection" / "clusters" / "cluster-0.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, good = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    first = json.loads(meta["soppu-quantized"])["tensors"][0][0]
    nan = good["q.scales"].clone()
    nan[0] = float("nan")
    for bad, says in (
        (nan, "its scales hold NaN"),
        (good["q.scales"][:3].contiguous(), "its codes or scales are cut short"),
    ):
        save_file({**good, "q.scales": bad}, str(path), metadata=meta)
        with pytest.raises(CollectionError, match=rf"^cluster-0.safetensors: tensor {first}: {says}") as e:
            open_collection(out / "collection").bases(0)
        assert "\n" not in str(e.value)
    save_file(good, str(path), metadata=meta)
    assert open_collection(out / "collection").bases(0)
    body = json.loads((out / "collection" / "collection.json").read_text())
    (out / "collection" / "collection.json").write_text(json.dumps({**body, "version": 9}))
    with pytest.raises(CollectionError, match="version 9 is not one this soppu-hub reads .*upgrade soppu-hub"):
        read_collection(out / "collection")
    # a bundle: a newer version, a store record it cannot read, an Inf scale
    folder = tmp_path / "b"
    _compress(srcs[:2], folder, "--store-dtype", "int4")
    header_path = folder / "bundle" / "bundle.json"
    header = json.loads(header_path.read_text())
    header_path.write_text(json.dumps({**header, "version": 6}))
    with pytest.raises(BundleError, match="version 6 is newer .* upgrade soppu-hub"):
        load_bundle(folder / "bundle")
    header_path.write_text(json.dumps({**header, "store": {"dtype": "int3", "group": 64}}))
    with pytest.raises(BundleError, match="int3"):
        load_bundle(folder / "bundle")
    header_path.write_text(json.dumps(header))
    weights = folder / "bundle" / "bundle.safetensors"
    with safe_open(str(weights), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, "q.maxima": torch.full_like(tensors["q.maxima"], float("inf"))}, str(weights), metadata=meta)
    with pytest.raises(BundleError, match=r"bundle.safetensors: tensor \S+: its scales hold NaN, Inf"):
        load_bundle(folder / "bundle")
    save_file(tensors, str(weights))  # the index gone
    with pytest.raises(BundleError, match="bundle.safetensors: it holds no quantization index"):
        load_bundle(folder / "bundle")
    shutil.rmtree(folder)


def test_an_unknown_store_dtype_is_argparse_one_line(family, capsys):
    root, srcs = family
    with pytest.raises(SystemExit) as e:
        main(["compress", str(srcs[0]), "--no-push", "--out", "x", "--store-dtype", "int3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--store-dtype" in err[0] and "int8" in err[0] and "nf4" in err[0]
