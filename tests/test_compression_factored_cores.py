"""Factored cores: a JD-Full core of rank k < r / 2 is stored as its exact factors, counted as stored, read back
exactly, and old bundles with square cores still load and serve the same adapter."""

import json
import shutil

import pytest
import torch
from helpers import peft_loader
from safetensors.torch import load_file, save_file

from soppu_hub.compression.bundle import FactoredCore, ModuleBasis, load_bundle
from soppu_hub.compression.config import CompressConfig
from soppu_hub.compression.export import peft_factors
from soppu_hub.peft_format.layout import BUNDLE_DIR, BUNDLE_HEADER, BUNDLE_WEIGHTS
from soppu_hub.peft_format.read import read_adapter
from soppu_hub.pipeline.job import compress_folders

NAMES = ("a0", "a1", "a2", "a3")
RANK, SHARED_RANK = 2, 8  # 4 adapters of rank 2 under a shared rank of 8: every core is rank 2 in an 8 x 8 block


@pytest.fixture(scope="module")
def factored(tmp_path_factory, tiny_base):
    from lab.samples import write_sample_adapters

    root = tmp_path_factory.mktemp("factored")
    sources = write_sample_adapters(root / "in", base_model=str(tiny_base), names=NAMES, rank=RANK, shared=1)
    report = compress_folders(sources, root / "out", CompressConfig(rank=SHARED_RANK))
    return sources, root / "out", report


def _write_as_v1(bundle_dir):
    """Rewrite a bundle as format version 1 wrote it: every core a dense r x r matrix in one stack per module."""
    header = json.loads((bundle_dir / BUNDLE_HEADER).read_text())
    bundle = load_bundle(bundle_dir)
    tensors = load_file(str(bundle_dir / BUNDLE_WEIGHTS))
    old = {k: v for k, v in tensors.items() if k.endswith((".U", ".V"))}
    for name, mb in bundle.modules.items():
        order = sorted(mb.cores)
        old[f"{name}.cores"] = torch.stack([mb.core_matrix(i) for i in order]).contiguous()
        header["modules"][name] = {"rank": mb.rank, "adapters": order, "kind": mb.kind}
    header["version"] = 1
    save_file(old, str(bundle_dir / BUNDLE_WEIGHTS), metadata={"format": "soppu-bundle"})
    (bundle_dir / BUNDLE_HEADER).write_text(json.dumps(header))


def test_low_rank_cores_are_stored_as_exact_factors_and_counted_so(factored):
    sources, out, report = factored
    bundle = load_bundle(out / NAMES[0] / BUNDLE_DIR)  # one pushed repo's slice: the bases and its own core
    assert json.loads((out / NAMES[0] / BUNDLE_DIR / BUNDLE_HEADER).read_text())["version"] == 2
    adapter = read_adapter(sources[0])
    for name, mb in bundle.modules.items():
        core = mb.cores[0]
        assert (
            isinstance(core, FactoredCore)
            and core.P.shape == (SHARED_RANK, RANK)
            and core.Q.shape == (RANK, SHARED_RANK)
        )
        b, a = adapter.modules[name].factors()
        U, V = mb.U.double(), mb.V.double()
        torch.testing.assert_close(mb.core_matrix(0).double(), U.T @ b.double() @ a.double() @ V, rtol=1e-3, atol=1e-4)
    per_module = {name: mb.U.numel() + mb.V.numel() for name, mb in bundle.modules.items()}
    full = load_bundle(out / "bundle")
    stored = sum(mb.U.numel() + mb.V.numel() + len(mb.cores) * 2 * SHARED_RANK * RANK for mb in full.modules.values())
    assert report.params_after - report.carried_params == stored  # 2 r k per core, not r^2
    assert stored < sum(per_module.values()) + len(NAMES) * len(per_module) * SHARED_RANK**2
    assert all(a.max_rel_error < 1e-3 for a in report.adapters)  # rank 8 holds 4 x rank 2: exact


def test_leading_directions_switch_a_factored_core_to_dense_when_that_is_smaller():
    g = torch.Generator().manual_seed(0)
    P, Q = torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g)
    mb = ModuleBasis(torch.eye(10, 8), torch.eye(9, 8), {0: FactoredCore(P, Q)})
    assert mb.num_params == 80 + 72 + 32
    for j, factored_kept in ((6, True), (4, False), (3, False)):
        cut = mb.leading(j)
        assert isinstance(cut.cores[0], FactoredCore) is factored_kept
        assert cut.cores[0].numel() == min(2 * 2 * j, j * j)
        torch.testing.assert_close(cut.core_matrix(0), (P @ Q)[:j, :j])


def test_a_version_1_bundle_with_square_cores_reads_and_exports_the_same(factored, tmp_path):
    _, out, _ = factored
    old = tmp_path / "old"
    shutil.copytree(out / "bundle", old)
    _write_as_v1(old)
    new, square = load_bundle(out / "bundle"), load_bundle(old)
    for name, mb in square.modules.items():
        assert all(c.shape == (SHARED_RANK, SHARED_RANK) for c in mb.cores.values())
        for i in mb.cores:
            torch.testing.assert_close(mb.core_matrix(i), new.modules[name].core_matrix(i))
    for i in range(len(NAMES)):
        for name, (b, a) in peft_factors(new, i, RANK).items():
            b2, a2 = peft_factors(square, i, RANK)[name]
            torch.testing.assert_close(b @ a, b2 @ a2)


def test_an_old_bundle_serves_the_same_logits_as_the_new_one(factored, tmp_path, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from soppu_hub.serve.shared_bases import SharedBases

    _, out, _ = factored
    old = tmp_path / NAMES[1]
    shutil.copytree(out / NAMES[1], old)
    _write_as_v1(old / BUNDLE_DIR)
    ids = torch.randint(5, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    logits = []
    for folder in (out / NAMES[1], old):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
        shared = SharedBases()
        peft_model = shared.load(
            lambda path, name, model=model: PeftModel.from_pretrained(model, path, adapter_name=name).eval(),
            folder,
            "x",
        )
        with torch.no_grad():
            logits.append(peft_model(input_ids=ids).logits)
            with peft_model.disable_adapter():
                base = peft_model(input_ids=ids).logits
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    assert (logits[0] - base).abs().max() > 1e-3  # the adapter is really applied


def test_a_mixed_batch_of_factored_and_square_cores_matches_peft_row_by_row(factored, tmp_path, tiny_base):
    """Three adapters served from factored cores and one from a v1 (square) copy, in one batch with the base: the
    installed forward (thin per-row matmuls for the factored group) gives PEFT's own per-row logits."""
    from transformers import AutoModelForCausalLM

    from soppu_hub.serve.peft_patch import install
    from soppu_hub.serve.shared_bases import CoreLinear, SharedBases

    _, out, _ = factored
    old = tmp_path / "square"
    shutil.copytree(out / NAMES[3], old)
    _write_as_v1(old / BUNDLE_DIR)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    load = peft_loader(model)

    shared = SharedBases()
    for name in NAMES[:3]:
        shared.load(load, out / name, name)
    peft_model = shared.load(load, old, "square")
    kinds = {
        n: m.lora_A[n].factored
        for m in peft_model.modules()
        if hasattr(m, "lora_A")
        for n in m.lora_A
        if isinstance(m.lora_A[n], CoreLinear)
    }
    assert kinds == {"a0": True, "a1": True, "a2": True, "square": False}
    names = ["a0", "square", "__base__", "a2", "a1", "a0"]
    ids = torch.randint(5, 300, (len(names), 7), generator=torch.Generator().manual_seed(2))
    only = ["a0", "a1", "a2"] * 2  # the factored group alone covers the batch: no gather, no scatter
    with torch.no_grad():
        want, want_only = (peft_model(input_ids=ids, adapter_names=n).logits for n in (names, only))
        assert install(peft_model) > 0
        got, got_only = (peft_model(input_ids=ids, adapter_names=n).logits for n in (names, only))
        assert install(peft_model) == 0
        base = peft_model(input_ids=ids, adapter_names=["__base__"] * len(names)).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_only, want_only, rtol=1e-5, atol=1e-5)
    moved = (want - base).abs().amax((1, 2))
    assert moved[2] == 0 and (moved[[0, 1, 3, 4, 5]] > 1e-3).all()


def test_the_serve_bench_s_square_copy_holds_the_same_cores_dense(factored, tmp_path):
    from lab.bench.serve import _square_copy

    _, out, _ = factored
    _square_copy(out / NAMES[0], tmp_path / "square")
    before, after = load_bundle(out / NAMES[0] / BUNDLE_DIR), load_bundle(tmp_path / "square" / BUNDLE_DIR)
    assert any(isinstance(c, FactoredCore) for mb in before.modules.values() for c in mb.cores.values())
    for name, mb in after.modules.items():
        assert not any(isinstance(c, FactoredCore) for c in mb.cores.values())
        torch.testing.assert_close(mb.core_matrix(0), before.modules[name].core_matrix(0))
        assert torch.equal(mb.U, before.modules[name].U)
