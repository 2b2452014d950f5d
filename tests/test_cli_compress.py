"""`soppu-hub compress` end to end on folders: PEFT export, bundle round trip, report.json, refusals."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import peft_deltas
from safetensors.torch import load_file

from lab.samples import llama_module_shapes, synthetic_factors, write_adapter
from soppu_hub.cli import main
from soppu_hub.compression.bundle import load_bundle
from soppu_hub.peft_format.read import read_adapter

REPORT_KEYS = {
    "method",
    "rank",
    "device",
    "seconds",
    "params_before",
    "params_after",
    "carried_params",
    "compression_ratio",
    "clusters",
    "target_error",
    "budget",
    "choice",
    "bytes_before",
    "store_bytes",
    "compression_ratio_bytes",
    "export",
    "adapters",
    "poorly_kept",
    "written",
    "store",
}
ADAPTER_KEYS = {
    "name",
    "source",
    "output",
    "params_before",
    "lora_params",
    "carried_params",
    "carried",
    "export_rank",
    "cluster",
    "unpadded_rank",
    "lorax_exact_tp",
    "module_ranks",
    "export_params",
    "padding_params",
    "mean_rel_error",
    "max_rel_error",
    "modules",
    "private_directions",
    "export_dtype",
    "bytes_before",
    "export_bytes",
    "repo_bytes",
    "fit_mean_rel_error",
}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, sample_adapters):
    out = tmp_path_factory.mktemp("run") / "out"
    assert (
        main(
            [
                "compress",
                *map(str, sample_adapters),
                "--rank",
                "8",
                "--out",
                str(out),
                "--quiet",
                "--no-push",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    return out


def test_report_shape_and_numbers(compressed, sample_adapters):
    report = json.loads((compressed / "report.json").read_text())
    assert set(report) == REPORT_KEYS
    assert report["method"] == "full" and report["rank"] == 8 and report["device"] == "cpu"
    assert [a["name"] for a in report["adapters"]] == ["support-bot", "pirate-talk"]
    originals = [read_adapter(p) for p in sample_adapters]
    assert report["params_before"] == sum(a.num_params for a in originals)
    bundle = load_bundle(compressed / "bundle")
    shared = sum(mb.U.numel() + mb.V.numel() for mb in bundle.modules.values())
    assert report["params_after"] == shared + 2 * 14 * 8 * 8
    assert report["compression_ratio"] == pytest.approx(report["params_before"] / report["params_after"])
    # what is written, counted honestly: every repo carries the bases again beside its PEFT export
    written = report["written"]
    assert written["bundle_params"] == report["params_after"] - report["carried_params"]
    assert written["repo_params"] == sum(
        shared + 14 * 8 * 8 + a["export_params"] + a["carried_params"] for a in report["adapters"]
    )
    assert written["tensor_bytes"] == sum(p.stat().st_size for p in compressed.rglob("*.safetensors"))
    for entry, orig in zip(report["adapters"], originals):
        assert set(entry) == ADAPTER_KEYS
        assert entry["output"] == str(compressed / entry["name"])
        assert len(entry["modules"]) == 14
        recon = bundle.factors(entry["name"])
        for name, mod in orig.modules.items():
            W = mod.B.double() @ mod.A.double()
            B, A = recon[name]
            dense = ((W - B.double() @ A.double()).norm() / W.norm()).item()
            assert entry["modules"][name]["rel_error"] == pytest.approx(dense, abs=1e-5)
        errs = [m["rel_error"] for m in entry["modules"].values()]
        assert entry["max_rel_error"] == max(errs) and 0 < entry["mean_rel_error"] < 1


def test_peft_export_loads_and_equals_bundle(compressed, tiny_base):
    bundle = load_bundle(compressed / "bundle")
    for name in ["support-bot", "pirate-talk"]:
        folder = compressed / name
        assert sorted(p.name for p in folder.glob("*.safetensors")) == ["adapter_model.safetensors"]
        cfg = json.loads((folder / "adapter_config.json").read_text())
        # rank 8: config r 16 (LoRAX's rank at tp 1 and 2), each module written at 9, the least rank LoRAX pads to
        # 16 at both, alpha = rank (scale 1)
        assert cfg["r"] == 16 and cfg["lora_alpha"] == 16 and cfg["rank_pattern"] == cfg["alpha_pattern"]
        assert set(cfg["rank_pattern"].values()) == {9} and len(cfg["rank_pattern"]) == 14
        assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(tiny_base)
        keys = load_file(str(folder / "adapter_model.safetensors")).keys()
        assert all(
            k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
            for k in keys
        )
        deltas = peft_deltas(tiny_base, folder)
        for module, (B, A) in bundle.factors(name).items():
            torch.testing.assert_close(deltas[module], B @ A, atol=1e-5, rtol=1e-4)
        # the per-adapter bundle slice reconstructs the same thing and names the same basis
        own = load_bundle(folder / "soppu")
        assert own.adapters == [name] and own.basis_id() == bundle.basis_id()
        for module, (B, A) in own.factors(0).items():
            torch.testing.assert_close(B @ A, bundle.factors(name)[module][0] @ bundle.factors(name)[module][1])


def test_lossless_when_rank_covers_everything(tmp_path, sample_adapters, tiny_base):
    out = tmp_path / "out"
    assert (
        main(["compress", *map(str, sample_adapters), "--rank", "16", "--out", str(out), "--quiet", "--no-push"]) == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert max(a["max_rel_error"] for a in report["adapters"]) < 1e-5
    entry = report["adapters"][0]
    assert entry["unpadded_rank"] == 8  # rank(S_i) <= k_i: the adapter's own rank holds it exactly
    assert json.loads((out / "support-bot" / "adapter_config.json").read_text())["r"] == entry["export_rank"] == 16
    orig = read_adapter(sample_adapters[0])
    deltas = peft_deltas(tiny_base, out / "support-bot")
    for module, mod in orig.modules.items():
        torch.testing.assert_close(deltas[module], mod.B @ mod.A, atol=1e-5, rtol=1e-4)


def test_diag_method_and_many_adapters_keep_their_order(tmp_path):
    facs = synthetic_factors(llama_module_shapes(targets=("q_proj", "down_proj")), 12, 4, shared=2, seed=3)
    srcs = [write_adapter(tmp_path / f"a{i}", f, base_model="x", rank=4, alpha=8) for i, f in enumerate(facs)]
    out = tmp_path / "out"
    assert (
        main(
            ["compress", *map(str, srcs), "--rank", "6", "--method", "diag", "--out", str(out), "--quiet", "--no-push"]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert [a["name"] for a in report["adapters"]] == [f"a{i}" for i in range(12)]
    bundle = load_bundle(out / "bundle")
    assert all(c.shape == (6,) for mb in bundle.modules.values() for c in mb.cores.values())
    # a diagonal core has rank up to r, so the export keeps all r directions, zero-padded to 9 (config r 16: exact in
    # LoRAX at tensor parallel 1 and 2)
    assert json.loads((out / "a0" / "adapter_config.json").read_text())["r"] == 16
    entry = report["adapters"][0]
    assert (entry["unpadded_rank"], entry["export_rank"], entry["lorax_exact_tp"]) == (6, 16, [1, 2])
    assert entry["padding_params"] == 3 * 2 * (64 + 64 + 64 + 128)  # 3 zero ranks x 2 layers x (q: 64+64, down: 64+128)
    assert entry["module_ranks"] == [9, 9]
    exported = read_adapter(out / "a11")
    for module, (B, A) in bundle.factors("a11").items():
        torch.testing.assert_close(exported.modules[module].B @ exported.modules[module].A, B @ A, atol=1e-5, rtol=1e-4)


def test_fan_in_fan_out_gpt2_outputs_survive_compression(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)).eval()
    base.save_pretrained(tmp_path / "gpt2")
    lora = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False),
    )
    lora.save_pretrained(tmp_path / "lora")
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        want = lora(ids).logits
    assert (
        main(
            ["compress", str(tmp_path / "lora"), "--rank", "4", "--out", str(tmp_path / "out"), "--quiet", "--no-push"]
        )
        == 0
    )
    cfg = json.loads((tmp_path / "out" / "lora" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    fresh = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    got_model = PeftModel.from_pretrained(fresh, tmp_path / "out" / "lora")
    with torch.no_grad():
        got = got_model(ids).logits
        plain = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")(ids).logits
    assert not torch.allclose(want, plain, atol=1e-3)  # the adapter really changes the model
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "soppu_hub", *args], capture_output=True, text=True, timeout=600)


def test_progress_and_table_on_terminal_quiet_silences(tmp_path, sample_adapters):
    res = _cli("compress", *map(str, sample_adapters), "--rank", "4", "--out", str(tmp_path / "o1"), "--no-push")
    assert res.returncode == 0 and "support-bot" in res.stdout and "compressing" in res.stderr
    # piped, as here: no bar redraws (carriage returns, cursor moves), a few lines per phase, each phase done
    lines = res.stderr.splitlines()
    assert "\r" not in res.stderr and "\x1b[" not in res.stderr and len(lines) <= 3 * 11, res.stderr
    phases = list(dict.fromkeys(line.split(":")[0] for line in lines))
    assert phases == ["compressing", "exporting", "cards"], res.stderr
    assert all(any(line.startswith(f"{p}:") and line.endswith(" done") for line in lines) for p in phases)
    res = _cli(
        "compress", *map(str, sample_adapters), "--rank", "4", "--out", str(tmp_path / "o2"), "--quiet", "--no-push"
    )
    assert res.returncode == 0 and res.stdout == "" and res.stderr == ""


@pytest.mark.parametrize(
    "names, expected",
    [
        (["a", "b"], ["a", "b"]),
        (["a", "a", "a"], ["a", "a-2", "a-3"]),
        (["a", "a", "a-2"], ["a", "a-3", "a-2"]),  # a later input's own name is never taken by a suffix
        (["a-2", "a", "a"], ["a-2", "a", "a-3"]),
        (["Lora", "lora"], ["Lora", "lora-2"]),  # repo names on the Hub are case-insensitive
    ],
)
def test_unique_names_are_distinct_ignoring_case(names, expected):
    from soppu_hub.pipeline.job import unique_names

    out = unique_names(names)
    assert out == expected and len({o.lower() for o in out}) == len(out)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["compress", "a/b", "--token", "hf_secret", "--rank", "4"], "soppu-hub compress a/b --rank 4"),
        (["compress", "a/b", "--token=hf_secret"], "soppu-hub compress a/b"),
        (["compress", "--token", "hf_secret", "my lora"], "soppu-hub compress 'my lora'"),
    ],
)
def test_recorded_command_never_holds_the_token(argv, expected):
    from soppu_hub.cli import command_line

    assert command_line(argv) == expected


def test_token_given_on_the_command_line_is_in_no_written_file(tmp_path, sample_adapters):
    out = tmp_path / "out"
    secret = "hf_cmdline_secret_42"
    assert (
        main(
            [
                "compress",
                *map(str, sample_adapters),
                "--rank",
                "4",
                "--out",
                str(out),
                "--quiet",
                "--no-push",
                "--token",
                secret,
            ]
        )
        == 0
    )
    card = (out / sample_adapters[0].name / "README.md").read_text()
    assert "soppu-hub compress" in card and "--rank 4 --out" in card  # the command is recorded, without the token
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 5 and not [p for p in files if secret.encode() in p.read_bytes()]


def test_an_adapter_the_shared_bases_miss_is_named_with_the_ways_on(tmp_path, capsys):
    """Two adapters in disjoint subspaces at a shared rank that holds only one of them: the weaker one is named in
    the report, on the terminal and in its card, with the two ways on; a looser --max-adapter-error names none."""
    shapes = llama_module_shapes(hidden=64, layers=1, targets=("q_proj",))
    facs = synthetic_factors(shapes, 2, 4, shared=0, seed=5, scales=[10.0, 1.0])
    folders = [
        write_adapter(tmp_path / n, f, base_model="tiny", rank=4, alpha=4) for n, f in zip(("big", "small"), facs)
    ]
    out = tmp_path / "out"
    assert (
        main(["compress", *map(str, folders), "--rank", "4", "--weighting", "none", "--out", str(out), "--no-push"])
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    (miss,) = report["poorly_kept"]
    assert miss["name"] == "small" and miss["mean_rel_error"] > 0.9
    assert "--clusters 2 or auto" in miss["advice"] and "--rank (now 4)" in miss["advice"]
    assert f"warning: {miss['advice']}" in capsys.readouterr().out
    assert "poorly kept" in (out / "small" / "README.md").read_text()
    assert "poorly kept" not in (out / "big" / "README.md").read_text()
    loose = tmp_path / "loose"
    assert (
        main(
            [
                "compress",
                *map(str, folders),
                "--rank",
                "4",
                "--weighting",
                "none",
                "--max-adapter-error",
                "1.5",
                "--out",
                str(loose),
                "--no-push",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((loose / "report.json").read_text())["poorly_kept"] == []


def test_kill_mid_run_leaves_no_half_written_folder(tmp_path, sample_adapters, tiny_base):
    """`kill` (SIGTERM, what the demo's Ctrl-C sends its background checks) ends compress as Ctrl-C does: exit 130
    and the staging folder removed, not a .out.partial-* folder of hundreds of MB left behind."""
    import signal
    import time

    out = tmp_path / "o"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "soppu_hub",
            "compress",
            *map(str, sample_adapters),
            "--rank",
            "4",
            "--out",
            str(out),
            "--no-push",
            "--verify",
            "--verify-ranks",
            "1,2,3",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".o.partial-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".o.partial-*")), "the run never started writing"
    time.sleep(0.5)  # well inside the work: the verification loads the base model and generates
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert list(tmp_path.iterdir()) == [] and not out.exists()
