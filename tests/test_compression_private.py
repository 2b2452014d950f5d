"""Shared plus private (issue 33): residual directions per adapter, shared ranks per cluster and module chosen by
store, --budget and --target-error, never behind per-adapter truncated SVD, bundles of format 4 read and served."""

import json
import math

import pytest
import torch
from helpers import peft_loader

from lab.samples import family_factors, llama_module_shapes, write_adapter
from soppu_hub.cli import main
from soppu_hub.compression.allocate import adapter_errors, adapter_norms, by_budget, by_target
from soppu_hub.compression.bundle import load_bundle
from soppu_hub.compression.config import CompressConfig, parse_budget
from soppu_hub.compression.plan import compress
from soppu_hub.compression.private import coordinates, private_factors, residual_spectra, shared_core
from soppu_hub.compression.refine import table_of
from soppu_hub.peft_format.layout import BUNDLE_DIR, BUNDLE_HEADER
from soppu_hub.peft_format.read import read_adapter

SHAPES = llama_module_shapes(hidden=64, layers=2, targets=("q_proj", "v_proj"))


def _random(n=5, m=40, d=30, k=4, r=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, A = (
        torch.randn(n, m, k, generator=g, dtype=torch.float64),
        torch.randn(n, k, d, generator=g, dtype=torch.float64),
    )
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
    return B, A, U, V


@pytest.mark.parametrize("j", [0, 2, 6])
def test_residual_spectra_and_private_factors_match_the_dense_residual(j):
    B, A, U, V = _random()
    co = coordinates(B[None], A[None], U[None], V[None])
    left, sig = residual_spectra(co, [j], 4)
    for i in range(B.shape[0]):
        W = B[i] @ A[i]
        R = W - U[:, :j] @ U[:, :j].T @ W @ V[:, :j] @ V[:, :j].T
        s = torch.linalg.svdvals(R)
        torch.testing.assert_close(left[0, 0, i], R.pow(2).sum())
        torch.testing.assert_close(sig[0, 0, i], s[:4].pow(2))
        for p in (0, 1, 3):
            P, Q = shared_core(co, j, 0, i)
            X, Y = private_factors(co, j, p, 0, i)
            kept = U[:, :j] @ P @ Q @ V[:, :j].T + X @ Y
            want = left[0, 0, i] - sig[0, 0, i, :p].sum()
            torch.testing.assert_close((W - kept).pow(2).sum(), want, rtol=1e-8, atol=1e-8)
    # j = 0 is per-adapter truncated SVD: all of W's spectrum
    assert torch.allclose(residual_spectra(co, [0], 4)[1][0, 0, 0], torch.linalg.svdvals(B[0] @ A[0])[:4].pow(2))


def _tables(seed=0):
    B, A, U, V = _random(seed=seed)
    ranks = torch.full((B.shape[0],), 4)
    return [table_of(B, A, ranks, U, V, 0, "m", list(range(B.shape[0])))[0]], B, A


def _modules(count=8):
    """One table per module position for the same 5 adapters: four with steep spectra, one flat."""
    out = []
    for pos in range(count):
        B, A, U, V = _random(seed=100 + pos)
        B = B * torch.tensor([1.0, 0.3, 0.1, 0.03])  # steep spectra: the first direction holds most of each
        B[1] = B[1] / torch.tensor([1.0, 0.3, 0.1, 0.03])  # but adapter 1's is flat: every direction buys as little
        out.append(table_of(B, A, torch.full((5,), 4), U, V, 0, f"m{pos}", list(range(5)))[0])
    return out


def test_by_target_meets_it_with_the_smallest_store_of_all_options():
    (table,), B, A = _tables()
    for target in (0.05, 0.3, 0.6, 0.9):
        ch = by_target(table, target)
        assert all(e <= (target**2 + 1e-9) * n for e, n in zip(ch.sq_errors, table.sq_norms.tolist()))
        # brute force over every rank and every member's own p: none meeting the target stores less
        best = math.inf
        for j in range(len(table.ranks)):
            lim = target**2 * table.sq_norms + 1e-12
            ok = table.errors[j] <= lim[:, None]
            if ok.any(-1).all():
                best = min(best, table.stored(j, ok.to(torch.int8).argmax(-1)))
        assert ch.stored == best
        # per-adapter SVD at the same target is one of the options (j = 0): never more than it
        svd = (
            sum(
                (table.errors[0, i] <= target**2 * table.sq_norms[i] + 1e-12).to(torch.int8).argmax().item()
                for i in range(len(table.members))
            )
            * table.width
        )
        assert ch.stored <= svd


def test_by_budget_fits_the_budget_and_lowers_the_error_as_it_grows():
    (table,), _, _ = _tables(1)
    norms = adapter_norms([table], 5)
    means = []
    for budget in (200, 400, 800, 1600):
        ch, _ = by_budget([table], budget, 5)
        assert ch[0].stored <= budget
        means.append(float(adapter_errors([table], ch, norms).pow(2).mean()))
    assert means == sorted(means, reverse=True) and means[-1] < means[0]
    with pytest.raises(ValueError) as e:
        by_budget([table], 50, 5)
    assert float(str(e.value)) > 50  # the smallest store possible, for the one-line error


def test_a_worst_adapter_cap_is_kept_where_the_budget_allows():
    tables = _modules()
    norms = adapter_norms(tables, 5)
    free, _ = by_budget(tables, 2500, 5)
    before = adapter_errors(tables, free, norms)
    capped, _ = by_budget(tables, 2500, 5, cap=0.9 * float(before.max()))
    after = adapter_errors(tables, capped, norms)
    assert sum(c.stored for c in capped) <= 2500 and float(after.max()) <= 0.9 * float(before.max())
    assert float(after.pow(2).mean()) >= float(before.pow(2).mean())  # the plain one's objective is the lowest there is


def test_by_budget_is_never_behind_uniform_svd_even_where_its_multiplier_is():
    """Three adapters of rank 2 beside two flat ones: per-adapter SVD at rank 2 keeps the three exact; the multiplier
    alone (sum of squares) spreads the directions and loses on the mean, the reweighting and the baseline as a
    candidate do not."""
    tables = []
    for pos in range(8):
        B, A, U, V = _random(seed=200 + pos)
        B[:3] = B[:3] * torch.tensor([1.0, 0.5, 0.0, 0.0])
        tables.append(table_of(B, A, torch.full((5,), 4), U[:, :0], V[:, :0], 0, f"m{pos}", list(range(5)))[0])
    norms = adapter_norms(tables, 5)
    svd = (sum(t.errors[0, :, 2] for t in tables) / norms).sqrt()  # j = 0, p = 2 everywhere
    store = sum(t.stored(0, torch.full((5,), 2)) for t in tables)
    for cap in (None, float(svd.max())):
        ch, _ = by_budget(tables, store, 5, cap=cap)
        err = adapter_errors(tables, ch, norms)
        assert sum(c.stored for c in ch) <= store
        assert float(err.mean()) <= float(svd.mean()) + 1e-12
        assert cap is None or float(err.max()) <= cap + 1e-12
    assert float(svd[:3].max()) == 0.0


def test_budget_text():
    assert parse_budget("6x") == ("ratio", 6.0)
    assert parse_budget("3.5M") == ("params", 3.5e6) and parse_budget("1200000") == ("params", 1.2e6)
    assert parse_budget("12MB") == ("bytes", 12e6) and parse_budget("8MiB") == ("bytes", 8 * 2**20)
    from soppu_hub.errors import ConfigError

    for bad in ("0.5x", "lots", "-3M", "5 parsecs", "Mx"):
        with pytest.raises(ConfigError, match="is not a store"):
            parse_budget(bad)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A collection as real ones are: 8 adapters of 2 families beside 4 adapters that share nothing (bf16 files)."""
    root = tmp_path_factory.mktemp("mixed")
    facs, _ = family_factors(SHAPES, 8, 4, families=2, family_dim=4, noise=0.02, seed=5)
    alone, _ = family_factors(SHAPES, 4, 4, families=4, family_dim=4, noise=0.3, seed=6)
    return [
        write_adapter(root / f"ad{i:02d}", f, base_model="tiny", rank=4, alpha=8, dtype=torch.bfloat16)
        for i, f in enumerate(facs + alone)
    ]


def _whole_errors(adapters, comp) -> list[float]:
    from soppu_hub.compression.scoring import delta_sq_norms

    out = []
    for i, a in enumerate(adapters):
        norms = {n: float(delta_sq_norms(*m.factors())) for n, m in a.modules.items()}
        err = sum(comp.stats[n].rel_errors[i] ** 2 * norms[n] for n in norms)
        out.append(math.sqrt(err / sum(norms.values())))
    return out


def test_never_behind_per_adapter_svd_at_its_own_stores(mixed):
    adapters = [read_adapter(f) for f in mixed]
    n = len(adapters)
    for rank in (1, 2, 3):
        svd = compress(adapters, CompressConfig(rank=rank, clusters=str(n), device="cpu"))
        svd_err = _whole_errors(adapters, svd)
        store = sum(b.num_params for b in svd.bundles)
        ours = compress(
            adapters,
            CompressConfig(rank=16, clusters="auto", budget=str(store), device="cpu", max_adapter_error=max(svd_err)),
        )
        err = _whole_errors(adapters, ours)
        assert sum(b.num_params for b in ours.bundles) <= store
        assert sum(err) / n <= sum(svd_err) / n + 1e-6 and max(err) <= max(svd_err) + 1e-6
    # the families share: a split into clusters with shared ranks is what won, not per-adapter SVD everywhere
    assert ours.choice["clusters"] >= 2 and any(mb.rank > 0 for b in ours.bundles for mb in b.modules.values())


def test_clusters_auto_with_a_target_prices_every_k_up_to_singletons(mixed):
    adapters = [read_adapter(f) for f in mixed]
    comp = compress(adapters, CompressConfig(rank=16, clusters="auto", target_error=0.2, device="cpu"))
    scanned = [row["K"] for row in comp.choice["scan"]]
    assert scanned[0] == 1 and scanned[-1] == len(adapters)  # singletons are priced too
    chosen = next(r for r in comp.choice["scan"] if r["K"] == comp.choice["clusters"])
    assert all(chosen["stored"] <= r["stored"] for r in comp.choice["scan"])
    assert comp.choice["runner_up"]["K"] != comp.choice["clusters"]
    assert max(e for ms in comp.stats.values() for e in ms.rel_errors.values()) <= 0.2 + 1e-6
    # the adapters that share nothing keep directions of their own; family members need none
    private = comp.refined.private
    assert all(private[i] > 0 for i in range(8, 12)) and sum(private[i] for i in range(8)) < sum(
        private[i] for i in range(8, 12)
    )


def run(out, folders, *args) -> dict:
    assert (
        main(["compress", *map(str, folders), "--out", str(out), "--quiet", "--no-push", "--device", "cpu", *args]) == 0
    )
    return json.loads((out / "report.json").read_text())


def test_exports_hold_exactly_what_the_bundle_reconstructs_and_bundles_are_version_4(mixed, tmp_path):
    report = run(tmp_path / "out", mixed, "--rank", "8", "--budget", "5x", "--clusters", "auto")
    assert report["compression_ratio"] >= 5 - 1e-9 and report["budget"] == "5x"
    assert report["choice"]["private_directions"] > 0 and "scan" in report["choice"]
    with_private = [a for a in report["adapters"] if a["private_directions"]]
    assert with_private
    for entry in with_private:
        folder = tmp_path / "out" / entry["name"]
        header = json.loads((folder / BUNDLE_DIR / BUNDLE_HEADER).read_text())
        assert header["version"] == 4 and any("private" in m for m in header["modules"].values())
        bundle = load_bundle(folder / BUNDLE_DIR)
        export = read_adapter(folder)
        assert (
            entry["export_rank"] >= entry["unpadded_rank"] >= max(mb.private_rank(0) for mb in bundle.modules.values())
        )
        for name, (B, A) in bundle.factors(0).items():
            b, a = export.modules[name].factors()
            torch.testing.assert_close(b.double() @ a.double(), B.double() @ A.double(), rtol=2e-2, atol=2e-3)


def test_bad_budgets_are_one_line(mixed, tmp_path, capsys):
    cases = [
        (["--budget", "lots"], "--budget 'lots' is not a store"),
        (["--budget", "100"], "is below the smallest store possible here"),
        (["--budget", "6x", "--target-error", "0.2"], "--budget and --target-error contradict each other"),
        (["--budget", "6x", "--method", "diag"], "--budget needs --method full"),
        (["--budget", "6x", "--adapter-error", "0.2"], "--budget and --adapter-error contradict each other"),
        (["--budget", "3000", "--clusters", "12", "--shared-only"], "each of the 12 cluster(s) at shared rank 1"),
        (["--adapter-error", "1.5"], "--adapter-error must be between 0 and 1"),
    ]
    for args, expected in cases:
        out = tmp_path / "x"
        code = main(["compress", *map(str, mixed), "--out", str(out), "--quiet", "--no-push", "--device", "cpu", *args])
        err = capsys.readouterr().err.strip()
        assert code != 0 and expected in err and len(err.splitlines()) == 1, err
        assert not out.exists() and not list(tmp_path.glob(".x.partial-*"))


def test_an_adapter_with_private_directions_serves_its_export_s_logits(mixed, tmp_path, tiny_base):
    """Through the shared-bases loader and the installed batched forward, with a plain-JD adapter beside it."""
    from transformers import AutoModelForCausalLM

    from soppu_hub.serve.peft_patch import install
    from soppu_hub.serve.shared_bases import SharedBases

    facs, _ = family_factors(llama_module_shapes(), 6, 4, families=2, noise=0.3, seed=9)
    folders = [
        write_adapter(tmp_path / "in" / f"p{i}", f, base_model=str(tiny_base), rank=4, alpha=8)
        for i, f in enumerate(facs)
    ]
    report = run(tmp_path / "out", folders, "--rank", "8", "--target-error", "0.15")
    names = [a["name"] for a in report["adapters"]]
    assert any(a["private_directions"] for a in report["adapters"])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    load = peft_loader(model)
    shared = SharedBases()
    for name in names:
        peft_model = shared.load(load, tmp_path / "out" / name, name)
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    plain_load = peft_loader(plain)
    for name in names:
        plain_model = plain_load(str(tmp_path / "out" / name), name)
    ids = torch.randint(5, 300, (len(names), 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = plain_model(input_ids=ids, adapter_names=names).logits
        got = peft_model(input_ids=ids, adapter_names=names).logits
        assert install(peft_model) > 0
        batched = peft_model(input_ids=ids, adapter_names=names).logits
        base = peft_model(input_ids=ids, adapter_names=["__base__"] * len(names)).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched, want, rtol=1e-4, atol=1e-4)
    assert (want - base).abs().amax((1, 2)).min() > 1e-3


def test_a_resident_row_adds_its_members_private_directions():
    from soppu_hub.serve.resident import ModuleStack, ResidentRows

    g = torch.Generator().manual_seed(4)
    U, Vt = torch.randn(2, 10, 3, generator=g), torch.randn(2, 3, 7, generator=g)
    cores, cluster = torch.randn(4, 3, 3, generator=g), torch.tensor([0, 1, 1, 0])
    Xt, Yt = torch.randn(4, 2, 10, generator=g), torch.randn(4, 7, 2, generator=g)
    Xt[1], Yt[1] = 0, 0  # a member without private directions: zero rows of the padded stack
    st = ModuleStack(U, Vt, cores=cores, Xt=Xt, Yt=Yt)
    slots = torch.tensor([3, 1, 0, 2])
    x = torch.randn(4, 2, 7, generator=g)
    got = st.applier(ResidentRows(None, slots, cluster[slots]))(x)
    for row, k in enumerate(slots.tolist()):
        c = int(cluster[k])
        delta = U[c] @ cores[k] @ Vt[c] + Xt[k].T @ Yt[k].T
        torch.testing.assert_close(got[row], x[row] @ delta.T)


def test_private_directions_never_push_an_export_past_the_original_rank(tmp_path):
    """rank(W_i) <= k: shared rank 4 plus 2 private directions would make a rank-4 adapter's export rank 6 (and LoRAX
    pad it to 8: twice the bytes); it is written at rank 4, the best rank-4 approximation of what is stored."""
    from soppu_hub.compression.bundle import Bundle, ModuleBasis
    from soppu_hub.compression.export import ExportConfig, export_peft

    g = torch.Generator().manual_seed(0)
    U, V = torch.linalg.qr(torch.randn(32, 4, generator=g))[0], torch.linalg.qr(torch.randn(24, 4, generator=g))[0]
    mb = ModuleBasis(
        U,
        V,
        {0: torch.randn(4, 4, generator=g)},
        private={0: (torch.randn(32, 2, generator=g) * 0.1, torch.randn(2, 24, generator=g))},
    )
    bundle = Bundle(
        "full",
        ["a"],
        [{"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}],
        {"model.layers.0.self_attn.q_proj": mb},
    )
    assert bundle.export_rank(0) == 4
    info = export_peft(bundle, 0, tmp_path / "e", export=ExportConfig(pad=False))
    B, A = info.factors["model.layers.0.self_attn.q_proj"]
    L, R = mb.delta_factors(0)
    P, s, Qh = torch.linalg.svd((L @ R).double())
    best = (P[:, :4] * s[:4]) @ Qh[:4]
    assert info.rank == 4 and B.shape == (32, 4)
    torch.testing.assert_close((B @ A).double(), best, rtol=1e-5, atol=1e-6)
