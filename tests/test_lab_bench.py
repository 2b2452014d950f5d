"""The seeds' Algorithm 1 reference used by `python -m lab bench`: faithful, and scored against our kernel."""

import numpy as np
import pytest

from lab.bench.kernel import _errors
from lab.bench.seed_reference import seed_jd, seed_pipeline
from lab.samples import synthetic_factors, write_adapter
from soppu_hub.compression.config import CompressConfig
from soppu_hub.compression.plan import compress
from soppu_hub.peft_format.read import read_adapter


def test_seed_reference_clips_rank_and_our_kernel_is_no_worse(tmp_path):
    shapes = {f"model.layers.{i}.self_attn.{t}": (48, 40) for i in range(2) for t in ("q_proj", "v_proj")}
    facs = synthetic_factors(shapes, 2, 4, shared=2, seed=1, scales=[1.0, 0.1])
    folders = [write_adapter(tmp_path / f"a{i}", f, base_model="x", rank=4, alpha=4) for i, f in enumerate(facs)]
    adapters = [read_adapter(f) for f in folders]
    ours = compress(adapters, CompressConfig(rank=6, device="cpu"))
    for module in shapes:
        U, V, S = seed_jd(
            [a.modules[module].A.numpy() for a in adapters], [a.modules[module].B.numpy() for a in adapters], 6
        )
        assert U.shape == (48, 4) and S[0].shape == (4, 4)  # the seeds clip r to the LoRA rank
        np.testing.assert_allclose(U.T @ U, np.eye(4), atol=1e-10)
        seed_errs = _errors(adapters, module, U, V, S)
        ours_errs = [ours.stats[module].rel_errors[i] for i in range(2)]
        assert max(ours_errs) <= max(seed_errs) + 1e-6
    out = tmp_path / "seed.safetensors"
    result = seed_pipeline([str(f / "adapter_model.safetensors") for f in folders], str(out), 6, layers=1)
    assert sorted(result) == [(0, "q"), (0, "v")] and out.is_file()


def test_quality_bench_rows_on_tiny_adapters(tmp_path, sample_adapters, tiny_base):
    """Every method at each setting, scored on held-out examples; at a rank holding the adapters exactly, every
    method keeps the original's score (retention 1) and per-adapter SVD stores one basis per adapter; two soppu-hub
    budget rows follow each of the first SVD ranks; the families table groups adapters by task."""
    from lab.bench.quality import JD, SOPPU, SVD, format_quality, matched_budgets, plot_quality, quality_rows

    sets = [[("Hello!", "I am fine, thank you."), ("What is the capital of France?", "Paris.")]] * len(sample_adapters)
    rows = quality_rows(
        tiny_base,
        list(sample_adapters),
        sets,
        ranks=(2, 16),
        adapter_errors=(0.5,),
        svd_ranks=(2, 16),
        budget_svd=(2,),
        stores=("float32", "nf4"),
    )
    assert [r["method"] for r in rows] == [SVD] * 2 + [JD] * 2 + [SOPPU] * 6
    f32, nf4 = rows[-2:]  # the demo's setting kept in float32 and in NF4 codes: the same fit, 7x fewer bytes
    rows = rows[:-2]
    assert (f32["store"], nf4["store"]) == ("float32", "nf4") and f32["stored_params"] == nf4["stored_params"]
    assert nf4["store_bytes"] < f32["store_bytes"] / 6 and nf4["ratio_bytes"] > 6 * f32["ratio_bytes"]
    assert f32["exported_mean_error"] <= nf4["exported_mean_error"] < f32["exported_mean_error"] + 0.2
    assert plot_quality([f32, nf4], tmp_path / "b.png", unit="bytes").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for budget in rows[-2:]:  # the lowest error at SVD rank 2's store, and the same with its worst error as the cap
        assert (
            budget["setting"]["budget"] == str(rows[0]["stored_params"])
            and budget["stored_params"] <= rows[0]["stored_params"]
        )
    assert "max_adapter_error" not in rows[-2]["setting"] and rows[-1]["setting"]["max_adapter_error"] > 0
    for r in rows:
        if r["setting"].get("rank") == 16:
            assert r["worst_error"] < 1e-5 and r["mean_retention"] in (1.0, None)
            # lossless: each adapter's exact match is its original's (retention 1 where the original scores)
            assert all(e["compressed"] == e["original"] for e in r["exact_match"].values())
            assert all(e["retention"] in (1.0, None) for e in r["exact_match"].values())
    names = {f.name for f in sample_adapters}
    for r in rows:  # every adapter's own retention, and the one that keeps least named
        assert set(r["retention"]) <= names and (
            r["worst_adapter"] is None or r["retention"][r["worst_adapter"]] == r["worst_retention"]
        )
        assert sum(f["adapters"] for f in r["families"].values()) == len(r["retention"])
    assert all(r["clusters"] == len(sample_adapters) for r in rows if r["method"] == SVD)
    jd = [r for r in rows if r["method"] == JD]
    assert jd[0]["stored_params"] < jd[1]["stored_params"] and jd[0]["ratio"] > jd[1]["ratio"]
    table = format_quality(rows)
    assert "| per-adapter SVD | rank 16, clusters 2 |" in table and "per task family" in table
    # matched budgets: the budget row at SVD rank 2's store keeps at least as much, mean and worst
    at2 = next(m for m in matched_budgets(rows) if m["svd"]["setting"]["rank"] == 2)
    assert at2["jd"]["stored_params"] <= at2["svd"]["stored_params"]
    assert table.count("\nAt ") == 2 and "\nGoal (6x fewer" in table
    assert plot_quality(rows, tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quality_verdicts_from_rows():
    """The goal row is the most compressed one keeping the retention bar; each SVD row meets the best soppu-hub row
    storing no more, which can keep less (said so) or not exist."""
    from lab.bench.quality import SOPPU, SVD, format_quality, goal_row, matched_budgets

    def row(method, rank, stored, ratio, mean, worst):
        return {
            "method": method,
            "setting": {"rank": rank},
            "stored_params": stored,
            "params_before": 1000,
            "ratio": ratio,
            "clusters": 1,
            "mean_error": 0.1,
            "worst_error": 0.2,
            "mean_retention": mean,
            "worst_retention": worst,
            "seconds": 1.0,
        }

    rows = [
        row(SOPPU, 16, 100, 10.0, 0.90, 0.80),
        row(SOPPU, 32, 200, 5.0, 0.97, 0.90),
        row(SVD, 1, 150, 6.7, 0.93, 0.70),
        row(SVD, 2, 250, 4.0, 0.99, 0.95),
        row(SVD, 1, 50, 20.0, 0.50, 0.10),
        row(SOPPU, 8, 140, 7.0, 0.94, 0.75),
    ]
    assert goal_row(rows)["stored_params"] == 200 and goal_row(rows[:1]) is None
    m = {r["svd"]["stored_params"]: r for r in matched_budgets(rows)}
    assert m[150]["jd"]["stored_params"] == 140 and m[150]["jd_keeps_more"]  # 0.94 >= 0.93 and 0.75 >= 0.70 at <= 150
    assert m[250]["jd"]["stored_params"] == 200 and not m[250]["jd_keeps_more"]
    assert m[50]["jd"] is None
    table = format_quality(rows)
    assert "not reached; the most compressed setting keeping that retention is soppu-hub (rank 32), 5.00x" in table
    assert "LESS" in table and "no soppu-hub setting stores this little" in table and "at least as much" in table
    assert "not reached; no setting keeps" in format_quality(rows[:1])


def test_peers_bench_scores_every_method_with_one_formula(tmp_path):
    """soppu-hub, per-adapter SVD and the real lorashare on the same tiny family set, each in a child process: rows
    with stored parameters, errors read back from the written PEFT folders, time and RSS; an exact setting scores 0;
    lorashare's stored count is its components plus loadings; a soppu-hub --budget row at every baseline's store is
    never behind it; mixed ranks make lorashare fail in one line."""
    from lab.bench.peers import adapter_errors, peer_rows
    from lab.bench.peers_report import DEFAULT, JD, SHARE, SOPPU, SVD, format_peers, frontier, plot_peers
    from lab.samples import family_factors, llama_module_shapes, write_adapter

    shapes = llama_module_shapes(hidden=64, layers=2, targets=("q_proj", "v_proj"))
    facs, _ = family_factors(shapes, 6, 4, families=2, noise=0.05, seed=0)
    folders = [
        write_adapter(tmp_path / "in" / f"a{i}", f, base_model="tiny", rank=4, alpha=8) for i, f in enumerate(facs)
    ]
    assert adapter_errors(folders, tmp_path / "in") == [0.0] * 6  # each folder against itself
    rows, failed = peer_rows("tiny", folders, have_share=True, ranks=(4, 24), svd_ranks=(1, 4), ks=(4, 8))
    assert failed == []
    methods = [r["method"] for r in rows]
    assert methods.count(SHARE) == 2 and methods.count(SVD) == 2 and methods.count(JD) == 2
    for r in rows:
        assert (
            r["stored_params"] > 0
            and r["seconds"] > 0
            and r["peak_rss_gb"] > 0.05
            and 0 <= r["mean_error"] <= r["worst_error"]
        )
    exact = [r for r in rows if r["method"] == SVD and r["setting"]["rank"] == 4] + [
        r for r in rows if r["method"] == JD and r["setting"]["rank"] == 24
    ]
    assert all(r["worst_error"] < 1e-2 for r in exact)  # rank 4 of rank-4 adapters; 24 >= 6 x 4: bf16 rounding only
    share4 = next(r for r in rows if r["method"] == SHARE and r["setting"]["k"] == 4)
    # SHARE per module: k components for B's columns (m) and for A's rows (d), and 2 k r loadings per adapter
    assert share4["stored_params"] == sum(4 * (m + d) + 6 * 2 * 4 * 4 for m, d in shapes.values())
    assert share4["stored_bytes"] == 4 * share4["stored_params"]  # lorashare keeps float32
    for r in rows:  # bytes beside parameters: soppu-hub's store as kept (these fp32 inputs: float32)
        assert r["stored_bytes"] == 4 * r["stored_params"] and r["ratio_bytes"] == pytest.approx(r["ratio"])
    for base in (r for r in rows if r["method"] in (SVD, SHARE)):  # each baseline's own store gets a budget row
        ours = next(
            r for r in rows if r["method"] == SOPPU and r["setting"].get("budget") == str(base["stored_params"])
        )
        assert ours["stored_params"] <= base["stored_params"]
        assert ours["mean_error"] <= base["mean_error"] + 5e-3 and ours["worst_error"] <= base["worst_error"] + 5e-3
    assert any(r["setting"] == DEFAULT for r in rows)
    table = format_peers(rows, failed)
    assert "| tiny | lorashare (SHARE) | k 4 |" in table and "tiny, lorashare (SHARE) k 4" in table
    assert "never behind" in table and "the default (" in table
    assert frontier([(1, 0.5), (2, 0.6), (3, 0.4), (4, 0.4)]) == [(1, 0.5), (3, 0.4)]
    assert plot_peers(rows, tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_peers(rows, tmp_path / "b.png", unit="bytes").read_bytes()[:4] == b"\x89PNG"
    assert "| stored MB | fewer bytes |" in table
    mixed = folders[:2] + [
        write_adapter(
            tmp_path / "in" / "r8",
            family_factors(shapes, 1, 8, families=1, seed=9)[0][0],
            base_model="tiny",
            rank=8,
            alpha=8,
        )
    ]
    rows, failed = peer_rows("mixed", mixed, have_share=True, ranks=(4,), svd_ranks=(2,), ks=(4,))
    assert [r["method"] for r in rows if r["method"] == SHARE] == [] and len(failed) == 1
    assert failed[0].startswith("mixed: lorashare (SHARE) k 4 failed: ") and "\n" not in failed[0]
    from lab.bench.peers import uniform_subset

    assert uniform_subset(mixed) == [("real collection, its 2 rank-4 q/v adapters", folders[:2])]
    assert uniform_subset(folders) == []  # already uniform: no second set


def test_join_bench_end_to_end_at_a_small_size():
    """`python -m lab bench join` at 48 + 3 (+ 1 by the CLI): every join lands, within its download budget and near the
    refit's error, the CLI join exits 0, and the unseen family is refused."""
    import json

    from lab.bench.join import format_join, run_join_bench

    out = json.loads(run_join_bench(48, 3, clusters="8", cli_joins=1, as_json=True))
    assert len(out["joins"]) == 3 and [c["rc"] for c in out["cli"]] == [0]
    assert (
        out["clusters"] == 8
        and not out["refused"]
        and 0 < out["cli"][0]["downloaded"] <= max(out["bases_bytes"]) + 2_000_000
    )
    for j in out["joins"]:
        assert j["downloaded"] <= max(out["bases_bytes"]) + j["adapter_bytes"]
        # 6 members a family fit their own noise, a joiner cannot: 1.6x here, 1.03x at 900 (the bench's goal is there)
        assert j["error"] <= 2.0 * out["refit_error"][j["name"]]
    assert not out["unseen"].startswith("JOINED") and "--new-cluster" in out["unseen"]
    table = format_join(out, 48)
    assert "48 adapters, 8 clusters" in table and "refused: " in table
    assert out["resident"]["cached"]["members"] == 48 + 3  # the library joiners too (the CLI joins come after)


def test_serve_curve_arrivals_are_poisson_and_zipf_skews_popularity():
    from lab.bench.serve_load import arrivals

    uniform = arrivals(4000, 40.0, 16, zipf=None, seed=1)
    assert uniform == arrivals(4000, 40.0, 16, zipf=None, seed=1)  # a fixed seed: the same stream
    times = [t for t, _ in uniform]
    assert all(b > a for a, b in zip(times, times[1:])) and abs(times[-1] / 4000 - 1 / 40) < 0.1 / 40
    counts = [sum(1 for _, i in uniform if i == k) for k in range(16)]
    assert min(counts) > 150 and max(counts) < 350  # about 250 each
    skewed = arrivals(4000, 40.0, 16, zipf=1.2, seed=1)
    top = sum(1 for _, i in skewed if i == 0)
    assert top > 4 * sum(1 for _, i in skewed if i == 15) and top > 800


def test_serve_curve_workload_is_described_from_its_files(tmp_path):
    """The real collection mixes ranks and target modules: the bench's JSON says so, not the tiny defaults."""
    from lab.bench.serve_load import _shapes
    from lab.collection.build import COLLECTION
    from lab.samples import build_tiny_llama

    base = build_tiny_llama(tmp_path / "base", hidden=32, layers=3)
    adapters = sorted(p for p in (COLLECTION / "adapters").iterdir() if (p / "adapter_config.json").is_file())
    got = _shapes(base, adapters)
    assert got["hidden"] == 32 and got["layers"] == 3
    assert got["lora_ranks"] == [8, 16] and {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(got["targets"])


def test_serve_curve_end_to_end_at_a_small_size(tmp_path):
    """Both servers, the reference, two adapter counts: every request answered, the table and the plot written."""
    from lab.bench.serve_load import measure_load
    from lab.bench.serve_load_report import format_load, plot_load

    m = measure_load([1, 12], 10, new_tokens=4, rate=50.0, hidden=64, layers=2, lora_rank=4, rank=8)
    assert [(r["method"][:5], r["adapters"]) for r in m["rows"]] == [
        ("one p", 1),
        ("JD co", 1),
        ("plain", 1),
        ("JD co", 12),
        ("plain", 12),
        ("one p", 1),
    ]
    assert all(
        r["tokens"] == 10 * 4 and r["tokens_per_s"] > 0 and r["latency_p99"] >= r["latency_p50"] for r in m["rows"]
    )
    # every case against the reference's pass run just before it; the reference rows themselves stand alone
    assert [("ref_tokens_per_s" in r) for r in m["rows"]] == [False, True, True, True, True, False]
    assert all(r["ref_tokens_per_s"] > 0 and len(r["ref_runs_tokens_per_s"]) == 1 for r in m["rows"][1:-1])
    assert (
        m["jd"]["members"] == 12
        and m["plain_bound_bytes"] == m["jd"]["resident_bytes"] > m["largest_adapter_bytes"] > 0
    )
    assert {k: m["workload"][k] for k in ("hidden", "layers", "lora_ranks", "targets")} == {
        "hidden": 64,
        "layers": 2,
        "lora_ranks": [4],
        "targets": ["k_proj", "o_proj", "q_proj", "v_proj"],
    }
    table = format_load(m)
    assert "12 members resident" in table and "12: JD" in table and "raised" not in table and "ref beside" in table
    assert "hidden 64, 2 layers, LoRA r=4 on k/o/q/v" in table
    # where one adapter alone needs more than JD's whole collection (the real one), the bound is raised and said so
    assert "raised from JD's" in format_load({**m, "plain_bound_bytes": m["jd"]["resident_bytes"] + 1})
    plot_load(m, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_peers_verdicts_allow_round_off_and_nothing_more():
    """The same reconstruction by two code paths (per-adapter SVD through JD singletons, and soppu-hub's j = 0)
    differs in the last bits: never behind; one percent more error is behind."""
    from lab.bench.peers_report import SOPPU, SVD, verdicts

    svd = {
        "set": "s",
        "method": SVD,
        "setting": {"rank": 1},
        "stored_params": 100,
        "mean_error": 0.8243428960771293,
        "worst_error": 0.8337851779671808,
    }
    ours = {
        "set": "s",
        "method": SOPPU,
        "setting": {"budget": "100"},
        "stored_params": 99,
        "mean_error": 0.824342896086574,
        "worst_error": 0.8337851779782399,
    }
    assert verdicts([svd, ours])[0].endswith(": never behind")
    assert verdicts([svd, {**ours, "mean_error": svd["mean_error"] * 1.01}])[0].endswith(": BEHIND")
