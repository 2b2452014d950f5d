"""`python -m lab bench`: this kernel and CLI against the seeds' Algorithm 1 on the seeds' own setting."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lab import ROOT
from lab.bench.seed_reference import seed_jd
from lab.samples import synthetic_factors, write_adapter
from soppu_hub.compression.config import CompressConfig, resolve_device
from soppu_hub.compression.plan import compress
from soppu_hub.compression.scoring import reconstruction_sq_errors
from soppu_hub.peft_format.read import read_adapter

# Llama-3.2-1B: hidden 2048, 8 KV heads of 64 -> v_proj is 512 x 2048.
LLAMA_32_1B = {"q_proj": (2048, 2048), "v_proj": (512, 2048)}


def seed_setting_shapes(layers: int) -> dict[str, tuple[int, int]]:
    return {f"model.layers.{i}.self_attn.{t}": s for i in range(layers) for t, s in LLAMA_32_1B.items()}


def _errors(adapters, module: str, U, V, cores) -> list[float]:
    """Relative error of each adapter in one module, scored against its own core (float64, factored)."""
    B = torch.stack([a.modules[module].B for a in adapters]).unsqueeze(0)
    A = torch.stack([a.modules[module].A for a in adapters]).unsqueeze(0)
    U, V = torch.as_tensor(U).unsqueeze(0), torch.as_tensor(V).unsqueeze(0)
    S = torch.stack([torch.as_tensor(c) for c in cores]).unsqueeze(0)
    sq = reconstruction_sq_errors(B, A, U, V, S)[0]
    norms = ((B.double() @ A.double()).flatten(-2).pow(2).sum(-1))[0]
    return (sq.clamp_min(0) / norms).sqrt().tolist()


def _summary(errs: dict[str, list[float]]) -> tuple[list[float], float, float]:
    per_adapter = [sum(e[i] for e in errs.values()) / len(errs) for i in range(len(next(iter(errs.values()))))]
    worst = max(max(e) for e in errs.values())
    sumsq = sum(x * x for e in errs.values() for x in e)
    return per_adapter, worst, sumsq


def run_kernel_bench(layers: int = 16, ref_layers: int = 2, device: str = "auto", seed: int = 0, rank: int = 8) -> str:
    """Build the seeds' setting offline, time both sides in this one run, return the printed table."""
    ref_layers = min(ref_layers, layers)
    shapes = seed_setting_shapes(layers)
    facs = synthetic_factors(shapes, 2, 8, shared=4, seed=seed, scales=[1.0, 0.25])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = [
            write_adapter(tmp / f"adapter{i}", f, base_model="meta-llama/Llama-3.2-1B", rank=8, alpha=8)
            for i, f in enumerate(facs)
        ]
        adapters = [read_adapter(f) for f in folders]
        dev = resolve_device(device)
        config = CompressConfig(rank=rank, device=str(dev))
        compress(adapters, config)  # warm-up (CUDA context, allocator)
        ours = min((compress(adapters, config) for _ in range(3)), key=lambda c: c.seconds)

        ref_modules = [m for m in shapes if int(m.split(".")[2]) < ref_layers]
        t = time.perf_counter()
        seed_results = {
            m: seed_jd([a.modules[m].A.numpy() for a in adapters], [a.modules[m].B.numpy() for a in adapters], rank)
            for m in ref_modules
        }
        seed_kernel = time.perf_counter() - t
        seed_kernel_full = seed_kernel * layers / ref_layers

        ours_errs = {m: [ours.stats[m].rel_errors[i] for i in range(2)] for m in ref_modules}
        seed_errs = {m: _errors(adapters, m, *seed_results[m]) for m in ref_modules}
        ours_all = {m: [st.rel_errors[i] for i in range(2)] for m, st in ours.stats.items()}

        t = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "soppu_hub",
                "compress",
                *map(str, folders),
                "--rank",
                str(rank),
                "--out",
                str(tmp / "ours"),
                "--quiet",
                "--no-push",
                "--device",
                str(dev),
            ],
            check=True,
        )
        ours_cli = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lab.bench.seed_reference",
                *[str(f / "adapter_model.safetensors") for f in folders],
                "--rank",
                str(rank),
                "--layers",
                str(ref_layers),
                "--out",
                str(tmp / "seed.safetensors"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            cwd=ROOT,
        )
        seed_cli_measured = time.perf_counter() - t
        seed_cli = seed_cli_measured + seed_kernel * (layers - ref_layers) / ref_layers

    o_mean, o_worst, o_sumsq = _summary(ours_errs)
    s_mean, s_worst, s_sumsq = _summary(seed_errs)
    a_mean, a_worst, _ = _summary(ours_all)
    extrap = "" if ref_layers == layers else f" (measured on {ref_layers} layers, scaled x{layers / ref_layers:g})"
    rows = [
        ("", "soppu-hub JD (a)", "seeds' Alg. 1 (b)", "b / a"),
        (
            f"kernel seconds, {layers} layers",
            f"{ours.seconds:.4f}",
            f"{seed_kernel_full:.2f}{extrap}",
            f"{seed_kernel_full / ours.seconds:,.0f}x",
        ),
        (
            f"whole CLI run seconds, {layers} layers",
            f"{ours_cli:.2f}",
            f"{seed_cli:.2f}{extrap}",
            f"{seed_cli / ours_cli:,.1f}x",
        ),
        ("iterations", f"{max(st.iterations for st in ours.stats.values())} (converged)", "100 (fixed)", ""),
        (
            f"mean rel error adapter 0 / 1 ({ref_layers} layers)",
            f"{o_mean[0]:.4f} / {o_mean[1]:.4f}",
            f"{s_mean[0]:.4f} / {s_mean[1]:.4f}",
            "",
        ),
        (f"worst adapter-module rel error ({ref_layers} layers)", f"{o_worst:.4f}", f"{s_worst:.4f}", ""),
        (f"sum of squared rel errors ({ref_layers} layers)", f"{o_sumsq:.4f}", f"{s_sumsq:.4f}", ""),
    ]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = [
        f"setting: 2 LoRA adapters of rank 8 (second one 4x smaller, half of the subspace shared), q_proj + v_proj x "
        f"{layers} "
        f"layers at Llama-3.2-1B shapes (q 2048x2048, v 512x2048), shared rank {rank}; (a) on {ours.device}, float32; "
        "(b) numpy float64 on CPU",
        *("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows),
        f"(a) over all {layers} layers: mean rel error {a_mean[0]:.4f} / {a_mean[1]:.4f}, worst {a_worst:.4f}",
    ]
    return "\n".join(lines)
