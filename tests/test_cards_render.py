"""Card text as a pure function of the run's numbers (no files, no plots, no Hub)."""

from dataclasses import replace
from pathlib import Path

from helpers import report_from

from soppu_hub.cards.render import CardSpec, render_card, repo_report


def _report(**over):
    adapter = {
        "name": "my-lora",
        "source": "alice/my-lora",
        "output": "alice/my-lora-soppu",
        "params_before": 1000,
        "lora_params": 1000,
        "carried_params": 0,
        "carried": [],
        "export_rank": 16,
        "unpadded_rank": 8,
        "lorax_exact_tp": [1, 2],
        "export_params": 2000,
        "padding_params": 1000,
        "mean_rel_error": 0.1234,
        "max_rel_error": 0.2345,
        "modules": {"m": {"rel_error": 0.1234}},
        "cluster": 0,
        "export_dtype": "bfloat16",
        "bytes_before": 2_000_000,
        "export_bytes": 4_000_000,
        "repo_bytes": 5_600_000,
    }
    report = {
        "method": "full",
        "rank": 16,
        "device": "cpu",
        "seconds": 1.5,
        "params_before": 4000,
        "params_after": 800,
        "carried_params": 0,
        "compression_ratio": 5.0,
        "target_error": None,
        "bytes_before": 8_000_000,
        "store_bytes": 1_600_000,
        "compression_ratio_bytes": 5.0,
        "store": {"dtype": "bfloat16", "bytes_per_number": 2},
        "export": {"dtype": "bfloat16", "pad": "lorax", "lorax_tp": 2},
        "clusters": [{"id": 0, "size": 4, "rank": 16, "params": 800, "ranks": {"m": 16}}],
        "adapters": [adapter]
        + [{**adapter, "name": f"other-{i}", "output": f"alice/other-{i}-soppu"} for i in range(3)],
    }
    report.update(over)
    return report_from(report)


JOB = CardSpec(
    Path("unused"),
    0,
    "alice/my-lora-soppu",
    "org/base",
    ["alice/my-lora"],
    "soppu-hub compress alice/my-lora",
    "norm",
    None,
    {"license": "apache-2.0"},
)


def test_card_states_the_numbers_and_where_the_export_runs_exactly():
    text = render_card(_report(), JOB, ranks_png=None, sweep_png=None)
    assert text.startswith("---\n") and "base_model: org/base" in text and "license: apache-2.0" in text
    assert "| compression ratio | 5.00x |" in text and "**my-lora** (this repo) | 0.1234 | 0.2345 |" in text
    assert (
        "| LoRAX tensor parallel | the base model's head counts could not be read, so the sizes LoRAX runs it at "
        "were not checked; this export is exact at 1, 2 (padded for 2) |"
    ) in text
    known = render_card(
        _report(export={"dtype": "bfloat16", "pad": "lorax", "lorax_tp": 2, "lorax_sizes": [1, 2, 4]}),
        JOB,
        ranks_png=None,
        sweep_png=None,
    )
    assert (
        "| LoRAX tensor parallel | LoRAX runs the base at `--num-shard` 1, 2, 4; this export is exact at 1, 2 (padded "
        "for 2); at 4 LoRAX pads the rank and serves it too weak: re-export with `--lorax-tp 4` |"
    ) in known
    assert "--enable-lora --max-lora-rank 16 --lora-modules my-lora=alice/my-lora-soppu" in text
    assert "soppu-hub compress alice/my-lora" in text


def test_card_names_each_modules_own_rank():
    """An export whose modules are written at their own ranks (rank_pattern) says so, and a zero-free one names no
    padding."""
    one = {"export_rank": 8, "unpadded_rank": 6, "padding_params": 0, "lorax_exact_tp": [1], "module_ranks": [2, 6]}
    body = _report()
    report = _report(adapters=[{**a, **one} for a in [vars(x) for x in body.adapters]])
    text = " ".join(render_card(report, JOB, ranks_png=None, sweep_png=None).split())
    assert "its PEFT export, 4.00 MB (r = 8, its modules at ranks 2 to 6 in bfloat16)" in text
    assert (
        "| exported LoRA rank of this adapter | r = 8; its modules at ranks 2 to 6 (PEFT's `rank_pattern` / "
        "`alpha_pattern`, every module at scale 1; LoRAX pads them to 8 in memory) |"
    ) in text
    uniform = " ".join(render_card(_report(), JOB, ranks_png=None, sweep_png=None).split())
    assert "its modules at" not in uniform and "(needs 8; zero-padded: 1,000 zero parameters)" in uniform


def test_card_sizes_are_bytes_and_add_up():
    """The size paragraph counts bytes (issue 34): what this repo holds against its original, the export, the slice
    of the store, the store once; a repo larger than its original says so in numbers."""
    text = " ".join(render_card(_report(), JOB, ranks_png=None, sweep_png=None).split())
    assert "this repo holds 5.60 MB of tensors, 2.80x the original adapter's 2.00 MB" in text
    assert "its PEFT export, 4.00 MB (r = 16 in bfloat16)" in text and "(1.60 MB: its cores and a copy" in text
    assert (
        "takes 1.60 MB once, kept as bfloat16; the whole store is 1.60 MB against 8.00 MB for the 4 originals "
        "(5.00x fewer bytes)"
    ) in text
    q = _report(store={"dtype": "nf4", "group": 64, "bytes_per_number": 4.25 / 8}, store_bytes=425_000)
    q.adapters[0].fit_mean_rel_error = 0.1200
    text = " ".join(render_card(q, JOB, ranks_png=None, sweep_png=None).split())
    assert (
        "kept as nf4 (group-wise codes, 4.25 bits a number; the export is written from them, and they cost this "
        "adapter +0.0034 in mean relative error over the fit)"
    ) in text
    shared = " ".join(
        render_card(
            _report(collection={"name": "alice/c", "revision": None}), JOB, ranks_png=None, sweep_png=None
        ).split()
    )
    assert "its cores; the bases are in the collection, once" in shared


def test_card_and_repo_report_leave_out_run_timings():
    """Two runs with the same result write the same card and report, so a rerun can tell nothing changed."""
    slow, fast = _report(seconds=99.0), _report(seconds=0.1)
    assert render_card(slow, JOB, ranks_png=None, sweep_png=None) == render_card(
        fast, JOB, ranks_png=None, sweep_png=None
    )
    assert repo_report(slow, 0) == repo_report(fast, 0) and "seconds" not in repo_report(slow, 0)


def test_a_repo_report_carries_its_own_clusters_ranks_only():
    """A member repo of a run with many clusters holds its cluster's ranks per module, the others in brief: the
    demo's 24 repos of 12 clusters each carried all twelve (40 kB a repo)."""
    ranks = {f"layers.{i}.q_proj": i % 3 for i in range(30)}
    clusters = [{"id": c, "size": 2, "rank": 8, "params": 100 + c, "ranks": dict(ranks)} for c in range(12)]
    report = _report(clusters=clusters)
    report.adapters[0] = replace(report.adapters[0], cluster=7)
    got = repo_report(report, 0)["clusters"]
    assert [c["id"] for c in got] == list(range(12)) and [c["params"] for c in got] == [100 + c for c in range(12)]
    assert [c for c in got if "ranks" in c] == [clusters[7]]
    assert report.clusters[3]["ranks"] == ranks  # the run's own report is untouched


def test_an_unpadded_export_says_lorax_serves_it_too_weak():
    report = _report()
    report.adapters[0] = replace(
        report.adapters[0], export_rank=12, unpadded_rank=12, padding_params=0, lorax_exact_tp=[]
    )
    report.export["pad"] = "none"
    text = render_card(report, JOB, ranks_png=None, sweep_png=None)
    assert "LoRAX pads this rank at every size and serves the adapter too weak: re-export without `--no-pad`" in text


def test_error_plot_of_a_real_model_fits_a_card(tmp_path):
    """30 layers x 7 module types (SmolLM2, all linear): one readable figure at most 12 inches wide, not a strip."""
    import struct

    from soppu_hub.cards.plots import MAX_WIDTH, ClusterFigures

    kinds = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    modules = {
        f"model.layers.{i}.{k}": {"rel_error": 0.01 * (i % 7) + 0.001 * j}
        for i in range(30)
        for j, k in enumerate(kinds)
    }
    report = report_from(
        {"method": "full", "rank": 32, "adapters": [{"name": n, "modules": modules} for n in ("a", "b")]}
    )
    figures = ClusterFigures(report, [0, 1])
    try:
        png = figures.errors(0, tmp_path / "e.png").read_bytes()
    finally:
        figures.close()
    width, height = struct.unpack(">II", png[16:24])  # the PNG header's IHDR
    assert width <= MAX_WIDTH * 110 and width / height < 3.5, (width, height)
    assert sorted(figures.kinds) == sorted(k.split(".")[-1] for k in kinds) and len(figures.layers) == 30
    # past LINES_PAST layers a line per module type (210 bars blur), each point this adapter's error at that layer
    assert figures.lines and list(figures.marks["q_proj"].get_ydata()) == [
        modules[f"model.layers.{i}.self_attn.q_proj"]["rel_error"] for i in range(30)
    ]


def test_a_priced_run_names_what_was_chosen_and_the_runner_up():
    """--budget / --clusters auto: the card says how the store was chosen, the K tried, the runner-up, and this
    adapter's private directions; a plain JD run has no such rows."""
    choice = {
        "clusters": 2,
        "shared_only": False,
        "private_directions": 7,
        "adapters_with_private": 1,
        "priced_by": "error within --budget",
        "runner_up": {"K": 3, "stored": 1234.0, "mean_error": 0.2},
        "scan": [{"K": k, "stored": 1000.0 * k, "mean_error": 0.1} for k in (1, 2, 3, 4)],
    }
    report = _report(budget="6x", choice=choice)
    report.adapters[0].private_directions = 7
    text = render_card(report, JOB, ranks_png=None, sweep_png=None)
    assert "| chosen by | `--budget 6x`: the lowest error within that store" in text
    assert "2 cluster(s) out of the 4 K tried (1 to 4), the runner-up K = 3 at mean probe error 0.2000" in text
    assert "| private directions of this adapter | 7 (its own, beside the shared bases" in text
    plain = render_card(_report(), JOB, ranks_png=None, sweep_png=None)
    assert "chosen by" not in plain and "private directions of this adapter" not in plain


def test_the_error_plot_legend_names_only_this_adapters_module_types(tmp_path):
    """A cluster mixing q/v-only adapters with all-linear ones: each card's legend lists what its adapter has."""
    from soppu_hub.cards.plots import ClusterFigures

    def mods(kinds):
        return {f"model.layers.{i}.self_attn.{k}": {"rel_error": 0.1} for i in range(2) for k in kinds}

    report = report_from(
        {
            "method": "full",
            "rank": 8,
            "adapters": [
                {"name": "qv", "modules": mods(["q_proj", "v_proj"])},
                {"name": "all", "modules": mods(["q_proj", "k_proj", "v_proj", "o_proj"])},
            ],
        }
    )
    figures = ClusterFigures(report, [0, 1])
    try:
        figures.errors(0, tmp_path / "qv.png")
        own = [t.get_text() for t in figures.ax.get_legend().get_texts()]
        figures.errors(1, tmp_path / "all.png")
        every = [t.get_text() for t in figures.ax.get_legend().get_texts()]
    finally:
        figures.close()
    assert [t for t in own if t.endswith("proj")] == ["q_proj", "v_proj"]
    assert [t for t in every if t.endswith("proj")] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert any("range over the 2 adapters" in t for t in own)
    assert (tmp_path / "qv.png").read_bytes() != (tmp_path / "all.png").read_bytes()
