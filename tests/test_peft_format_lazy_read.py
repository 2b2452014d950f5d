"""Streaming: inputs are checked from their headers first, factors are read one module position at a time."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lab.samples import family_factors, llama_module_shapes, write_adapter
from soppu_hub.cli import main
from soppu_hub.compression import plan as compress_mod
from soppu_hub.compression.config import CompressConfig
from soppu_hub.compression.plan import compress
from soppu_hub.errors import AdapterError
from soppu_hub.peft_format.read import StreamedModule, read_adapter

SHAPES = llama_module_shapes(hidden=48, layers=3, targets=("q_proj", "v_proj"))


@pytest.fixture
def folders(tmp_path):
    facs, _ = family_factors(SHAPES, 7, 4, families=2, seed=4)
    return [
        write_adapter(tmp_path / "in" / f"ad{i}", f, base_model="tiny", rank=4, alpha=8, dtype=torch.bfloat16)
        for i, f in enumerate(facs)
    ]


def test_streamed_adapter_reads_the_same_factors_as_the_eager_one(folders):
    eager, streamed = read_adapter(folders[0]), read_adapter(folders[0], stream=True)
    assert all(isinstance(m, StreamedModule) for m in streamed.modules.values())
    assert streamed.dtype == eager.dtype == torch.bfloat16 and streamed.lora_params == eager.lora_params
    for name, mod in eager.modules.items():
        b, a = streamed.modules[name].factors()
        assert torch.equal(a, mod.A) and torch.equal(b, mod.B) and streamed.modules[name].shape == mod.shape


def test_compress_reads_one_module_position_across_all_adapters_at_a_time(folders, monkeypatch):
    """A counting reader: every read is one module of one adapter, and the kernel pass reads position after
    position, each across all 7 adapters, never a whole adapter ahead."""
    reads: list[tuple[str, str]] = []
    original = StreamedModule.factors

    def counting(self):
        reads.append((self.module, self.adapter))
        return original(self)

    monkeypatch.setattr(StreamedModule, "factors", counting)
    monkeypatch.setattr(compress_mod, "MAX_BATCH_ELEMENTS", 1)  # one position per kernel call, as at full scale
    adapters = [read_adapter(f, stream=True) for f in folders]
    assert reads == []  # headers only so far
    comp = compress(adapters, CompressConfig(rank=4, device="cpu"))
    n, positions = len(folders), len(SHAPES)
    assert len(reads) == n * positions
    runs = [reads[i : i + n] for i in range(0, len(reads), n)]
    assert all(len({m for m, _ in run}) == 1 and len({a for _, a in run}) == n for run in runs)
    assert len({run[0][0] for run in runs}) == positions and len(comp.bundles[0].modules) == positions


def test_a_broken_file_late_in_the_list_stops_the_run_before_any_compute(folders, tmp_path, monkeypatch, capsys):
    """Adapter 6 of 7 has a bad tensor shape: one line naming it, and the kernel never ran."""
    bad = folders[5] / "adapter_model.safetensors"
    t = load_file(str(bad))
    key = next(k for k in t if k.endswith("v_proj.lora_A.weight"))
    t[key] = torch.zeros(4, 47, dtype=torch.bfloat16)
    save_file(t, str(bad))
    calls = []
    monkeypatch.setattr(compress_mod, "joint_diagonalize", lambda *a, **k: calls.append(1))
    out = tmp_path / "out"
    assert main(["compress", *map(str, folders), "--out", str(out), "--no-push", "--quiet"]) == 2
    assert calls == [] and not out.exists()
    err = capsys.readouterr().err
    assert "ad5" in err and "47" in err and err.count("\n") == 1


def test_nan_found_while_streaming_is_one_line_naming_the_adapter(folders, tmp_path, capsys):
    bad = folders[3] / "adapter_model.safetensors"
    t = load_file(str(bad))
    key = next(k for k in t if k.endswith("layers.2.self_attn.q_proj.lora_B.weight"))
    t[key][0, 0] = float("nan")
    save_file(t, str(bad))
    out = tmp_path / "out"
    assert main(["compress", *map(str, folders), "--out", str(out), "--no-push", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ad3: ") and "NaN or Inf" in err and err.count("\n") == 1 and not out.exists()
    with pytest.raises(AdapterError):
        read_adapter(folders[3])  # the eager reader finds it at once
