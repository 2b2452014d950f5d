"""Clustering: planted task families are found, each cluster gets its own bases, --target-error picks ranks."""

import json
import re

import pytest
import torch

from lab.samples import family_factors, llama_module_shapes, write_adapter
from soppu_hub.cli import main
from soppu_hub.compression.cluster import adjusted_rand_index, choose_k, kmeans

SHAPES = llama_module_shapes(hidden=64, layers=2, targets=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """18 rank-4 adapters from 3 families (each family a 4-dim space per module), interleaved."""
    root = tmp_path_factory.mktemp("families")
    facs, fam = family_factors(SHAPES, 18, 4, families=3, noise=0.02, seed=1)
    folders = [write_adapter(root / f"ad{i:02d}", f, base_model="tiny", rank=4, alpha=4) for i, f in enumerate(facs)]
    return folders, fam


def run(tmp_path, folders, *args) -> dict:
    out = tmp_path / "out"
    assert (
        main(["compress", *map(str, folders), "--out", str(out), "--quiet", "--no-push", "--device", "cpu", *args]) == 0
    )
    return json.loads((out / "report.json").read_text())


def test_adjusted_rand_index_and_knee():
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 2, 2]) == 1.0
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) < 0
    params = {k: 100 * k for k in range(1, 6)}
    assert choose_k({1: 0.9, 2: 0.5, 3: 0.1, 4: 0.09, 5: 0.085}, params) == 3  # 9x less error for 3x the bases
    assert choose_k({1: 0.9, 2: 0.5, 3: 0.2, 4: 0.05, 5: 0.045}, params) == 4
    assert choose_k({1: 0.2, 2: 0.2}, params) == 1
    # one shared subspace: more clusters only fit noise, a small cut for K times the bases: one cluster
    assert choose_k({1: 0.05, 2: 0.045, 3: 0.04}, params) == 1
    assert choose_k({1: 0.0, 2: 0.0}, params) == 1  # exact everywhere: the fewest parameters
    # --target-error: the fewest parameters among the K that meet it, whatever the errors say
    assert choose_k({1: 0.3, 2: 0.1, 3: 0.05}, {1: 500, 2: 300, 3: 400}, meets={1: False, 2: True, 3: True}) == 2


def test_kmeans_is_deterministic_and_finds_separated_groups():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 10, generator=g) * 10
    X = torch.cat([c + torch.randn(25, 10, generator=g) for c in centres])
    a, b = kmeans(X, 4), kmeans(X, 4)
    assert torch.equal(a, b) and adjusted_rand_index(a.tolist(), [i // 25 for i in range(100)]) == 1.0


@pytest.mark.parametrize("clusters", ["3", "auto"])
def test_planted_families_are_recovered_and_fit_better_than_one_basis(tmp_path, families, clusters):
    folders, fam = families
    one = run(tmp_path / "one", folders, "--rank", "4")
    many = run(tmp_path / "many", folders, "--rank", "4", "--clusters", clusters)
    found = [a["cluster"] for a in many["adapters"]]
    assert adjusted_rand_index(found, fam) == 1.0
    assert [c["size"] for c in many["clusters"]] == [6, 6, 6] and len(one["clusters"]) == 1
    worst_many = max(a["max_rel_error"] for a in many["adapters"])
    assert worst_many < 0.1 < min(a["mean_rel_error"] for a in one["adapters"])


def test_each_cluster_has_its_own_bases_in_every_export(tmp_path, families):
    from soppu_hub.compression.bundle import load_bundle

    folders, fam = families
    report = run(tmp_path, folders, "--rank", "4", "--clusters", "3")
    out = tmp_path / "out"
    clusters = [load_bundle(out / "bundle" / f"cluster-{c}") for c in range(3)]
    assert sorted(len(b.adapters) for b in clusters) == [6, 6, 6]
    for a in report["adapters"]:
        own = load_bundle(out / a["name"] / "soppu")
        shared = clusters[a["cluster"]]
        assert own.adapters == [a["name"]] and a["name"] in shared.adapters
        for name, mb in own.modules.items():
            assert torch.equal(mb.U, shared.modules[name].U) and torch.equal(mb.V, shared.modules[name].V)
    assert sum(c["params"] for c in report["clusters"]) + report["carried_params"] == report["params_after"]


def test_target_error_picks_the_smallest_rank_per_module(tmp_path, families):
    folders, _ = families
    report = run(tmp_path, folders, "--rank", "12", "--clusters", "3", "--target-error", "0.2")
    ranks = [r for c in report["clusters"] for r in c["ranks"].values()]
    assert max(ranks) < 12 and min(ranks) >= 1  # a 4-dim family needs far less than 12
    assert (
        max(a["max_rel_error"] for a in report["adapters"]) <= 0.2 + 1e-3
    )  # bf16/fp32 rounding of the written factors
    tight = run(tmp_path / "tight", folders, "--rank", "12", "--clusters", "3", "--target-error", "0.001")
    assert tight["params_after"] > report["params_after"]
    assert max(a["max_rel_error"] for a in tight["adapters"]) <= 0.001 + 5e-3  # bf16 rounding of the written factors
    # the noise each adapter has of its own is cheaper kept privately than as shared directions every member pays for
    assert sum(a["private_directions"] for a in tight["adapters"]) > 0
    assert sum(a["private_directions"] for a in report["adapters"]) == 0  # at 0.2 the families' bases hold them


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--clusters", "0"], "--clusters must be a positive integer or auto"),
        (["--clusters", "19"], "--clusters 19 is more than the 18 adapters"),
        (["--clusters", "many"], "--clusters must be a positive integer or auto"),
        (["--target-error", "1.5"], "--target-error must be between 0 and 1"),
        (["--target-error", "0"], "--target-error must be between 0 and 1"),
    ],
)
def test_bad_cluster_flags_are_one_line_and_write_nothing(tmp_path, families, capsys, args, expected):
    folders, _ = families
    out = tmp_path / "out"
    assert main(["compress", *map(str, folders), "--out", str(out), "--no-push", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and not out.exists()


def test_cards_at_scale_are_bounded_and_the_same_in_worker_processes(tmp_path):
    """70 adapters (over cards.write.PARALLEL_CARDS): every card and report.json stays small, names its cluster, and
    the cards drawn by two worker processes are byte for byte those drawn in-process."""
    from soppu_hub.cards.render import MAX_PEERS

    shapes = llama_module_shapes(hidden=32, layers=2, targets=("q_proj",))
    facs, fam = family_factors(shapes, 70, 2, families=2, noise=0.02, seed=3)
    folders = [
        write_adapter(tmp_path / "in" / f"ad{i:02d}", f, base_model="tiny", rank=2, alpha=2) for i, f in enumerate(facs)
    ]
    outs = {}
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}"
        assert (
            main(
                [
                    "compress",
                    *map(str, folders),
                    "--out",
                    str(out),
                    "--quiet",
                    "--no-push",
                    "--rank",
                    "2",
                    "--clusters",
                    "2",
                    "--workers",
                    workers,
                ]
            )
            == 0
        )
        outs[workers] = out
    for i in (0, 33, 69):
        name = f"ad{i:02d}"
        repo = json.loads((outs["2"] / name / "report.json").read_text())
        assert repo["adapter"]["name"] == name and len(repo["adapters"]) <= MAX_PEERS < 70
        assert name in [a["name"] for a in repo["adapters"]]
        card = (outs["2"] / name / "README.md").read_text()
        assert (
            "shares its bases with | 34 other adapter(s): cluster" in card
            and len(re.findall(r"^\| (\*\*)?ad\d\d", card, re.M)) == 35
        )
        same = card.replace(str(outs["2"]), "OUT").replace("--workers 2", "--workers 1")
        assert same == (outs["1"] / name / "README.md").read_text().replace(str(outs["1"]), "OUT")
        for png in ("plots/errors_by_layer.png", "plots/params.png"):
            assert (outs["2"] / name / png).read_bytes() == (outs["1"] / name / png).read_bytes()
    assert (outs["2"] / "ad00" / "plots/errors_by_layer.png").read_bytes() != (
        outs["2"] / "ad02" / "plots/errors_by_layer.png"
    ).read_bytes()


def test_a_repo_lists_at_most_max_peers_of_its_cluster_in_run_order():
    from helpers import report_from

    from soppu_hub.cards.render import MAX_PEERS, peers, repo_report

    report = report_from(
        {
            "method": "full",
            "adapters": [
                {"name": f"a{i}", "cluster": i % 2, "mean_rel_error": 0.1, "modules": {"m": 1}} for i in range(300)
            ],
        }
    )
    listed = peers(report, 299)
    assert (
        len(listed) == MAX_PEERS and listed[-1]["name"] == "a299" and all(int(a["name"][1:]) % 2 == 1 for a in listed)
    )
    assert [int(a["name"][1:]) for a in listed] == sorted(int(a["name"][1:]) for a in listed)
    assert "modules" not in listed[0] and repo_report(report, 299)["adapter"]["modules"] == {"m": 1}


@pytest.mark.parametrize("families,n,expected", [(1, 16, 1), (8, 24, 8)])
def test_auto_counts_what_clusters_store(tmp_path, families, n, expected):
    """One planted subspace: more clusters would only fit each adapter's noise at K times the bases, so auto keeps
    one. Eight planted families: eight clusters, the families found (adjusted Rand >= 0.95)."""
    from soppu_hub.compression.config import CompressConfig
    from soppu_hub.compression.plan import compress
    from soppu_hub.peft_format.read import read_adapter

    facs, fam = family_factors(SHAPES, n, 4, families=families, noise=0.05, seed=3)
    adapters = [
        read_adapter(write_adapter(tmp_path / f"a{i:02d}", f, base_model="tiny", rank=4, alpha=4))
        for i, f in enumerate(facs)
    ]
    comp = compress(adapters, CompressConfig(rank=4, clusters="auto", device="cpu"))
    assert len(comp.bundles) == expected
    if families > 1:
        assert adjusted_rand_index(comp.cluster_of, fam) >= 0.95


def test_auto_scans_k_on_a_sample_of_a_large_collection(tmp_path, monkeypatch):
    """Past AUTO_K_SAMPLE adapters the K scan runs on a fixed sample (here 12 of 36): the same K and the same split
    of all 36 as a scan over every adapter."""
    from soppu_hub.compression import assign
    from soppu_hub.compression.config import CompressConfig
    from soppu_hub.compression.plan import compress
    from soppu_hub.peft_format.read import read_adapter

    facs, fam = family_factors(SHAPES, 36, 4, families=3, noise=0.05, seed=4)
    adapters = [
        read_adapter(write_adapter(tmp_path / f"a{i:02d}", f, base_model="tiny", rank=4, alpha=4))
        for i, f in enumerate(facs)
    ]
    full = compress(adapters, CompressConfig(rank=4, clusters="auto", device="cpu"))
    calls = []
    real_jd = assign.joint_diagonalize
    monkeypatch.setattr(assign, "joint_diagonalize", lambda B, *a, **k: calls.append(B.shape[1]) or real_jd(B, *a, **k))
    monkeypatch.setattr(assign, "AUTO_K_SAMPLE", 12)
    sampled = compress(adapters, CompressConfig(rank=4, clusters="auto", device="cpu"))
    assert max(calls) == 12  # the one-cluster probe fit saw the sample only
    assert len(sampled.bundles) == len(full.bundles) == 3
    assert adjusted_rand_index(sampled.cluster_of, fam) >= 0.95


def test_captured_energy_matches_the_dense_projection():
    from soppu_hub.compression.cluster import captured

    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(5, 40, 4, generator=g), torch.randn(5, 4, 30, generator=g)
    U = torch.linalg.qr(torch.randn(40, 6, generator=g))[0]
    V = torch.linalg.qr(torch.randn(30, 6, generator=g))[0]
    W = (B @ A).double()
    dense = (U.double().T @ W @ V.double()).pow(2).sum((-2, -1)) / W.pow(2).sum((-2, -1))
    torch.testing.assert_close(captured(B, A, U, V), dense, rtol=1e-5, atol=1e-6)
    B[2] = 0  # an all-zero delta counts as held entirely
    assert captured(B, A, U, V)[2] == 1.0


def test_priced_ties_choose_the_fewest_clusters_whatever_the_float_noise():
    """Stores equal and errors equal to float noise: the fewest clusters, however the noise falls (one thread and
    two chose K = 1 and K = 3 on the sample collection before); a real difference in error still decides."""
    from soppu_hub.compression.assign import TIE, _rank

    rows = [
        {"K": 3, "stored": 100.0, "mean_error": 0.25},
        {"K": 1, "stored": 100.0, "mean_error": 0.25 * (1 + TIE / 10)},
        {"K": 2, "stored": 90.0, "mean_error": 0.4},
    ]
    assert [r["K"] for r in _rank(rows, by_error=False)] == [2, 1, 3]  # the smallest store first, then K 1 over 3
    rows[1]["mean_error"] = 0.25 * (1 + 10 * TIE)  # K = 1 is really worse now
    assert [r["K"] for r in _rank(rows, by_error=False)] == [2, 3, 1]
    budget = [
        {"K": 4, "stored": 80.0, "mean_error": 0.2},
        {"K": 1, "stored": 95.0, "mean_error": 0.2 * (1 + TIE / 10)},
        {"K": 2, "stored": 80.0, "mean_error": 0.2 * (1 - TIE / 10)},
    ]
    assert [r["K"] for r in _rank(budget, by_error=True)] == [2, 4, 1]  # equal errors: the smaller store, then fewer K


def test_one_thread_or_two_choose_the_same_and_export_the_same_deltas(tmp_path):
    """The same command with 1 and 2 torch threads: the same clusters and choice, and every export's delta B A the
    same to float32 round-off (the factors themselves may differ by signs and rotations: the bytes are not
    identical, the adapters are)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from lab.samples.collection import COLLECTION

    srcs = sorted(str(p) for p in (COLLECTION / "adapters").iterdir() if p.is_dir())[:8]
    for t in (1, 2):
        code = (
            f"import sys, torch; torch.set_num_threads({t}); from soppu_hub.cli import main; "
            f"sys.exit(main(['compress', *{srcs!r}, '--no-push', '--quiet', '--out', {str(tmp_path / str(t))!r}]))"
        )
        assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    one, two = (json.loads((tmp_path / t / "report.json").read_text()) for t in ("1", "2"))
    assert [c["size"] for c in one["clusters"]] == [c["size"] for c in two["clusters"]]
    assert one["params_after"] == two["params_after"] and one["choice"]["clusters"] == two["choice"]["clusters"]
    for a in one["adapters"]:
        x, y = (load_file(str(tmp_path / t / a["name"] / "adapter_model.safetensors")) for t in ("1", "2"))
        for k in (k for k in x if k.endswith("lora_A.weight")):
            b = k.replace("lora_A", "lora_B")
            wx, wy = x[b].double() @ x[k].double(), y[b].double() @ y[k].double()
            tol = 1e-5 if x[k].dtype == torch.float32 else 2e-2
            assert float((wx - wy).norm() / wy.norm().clamp_min(1e-30)) < tol, (a["name"], k)
