"""`python -m lab bench serve`: throughput of the embedded backend, one adapter vs many distinct adapters."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import urllib.request
from pathlib import Path

from lab.samples import build_tiny_llama, llama_module_shapes, synthetic_factors, write_adapter
from soppu_hub.compression.config import CompressConfig
from soppu_hub.launch import start_backend
from soppu_hub.pipeline.job import compress_folders

PROMPT = "Hello! How are you today?"


async def _burst(url: str, adapters: list[str | None], new_tokens: int) -> tuple[float, int]:
    from lorax import AsyncClient

    client = AsyncClient(url, timeout=600)
    start = time.perf_counter()
    results = await asyncio.gather(
        *[
            client.generate(
                PROMPT,
                max_new_tokens=new_tokens,
                adapter_id=a,
                adapter_source="local",
                ignore_eos_token=True,
                details=True,
            )
            for a in adapters
        ]
    )
    seconds = time.perf_counter() - start
    return seconds, sum(r.details.generated_tokens for r in results)


async def _short_during_long(url: str, adapter: str, long_tokens: int = 256, short_tokens: int = 4) -> dict:
    """A short request sent while a long one runs: how long each takes (continuous batching makes it quick)."""
    from lorax import AsyncClient

    client = AsyncClient(url, timeout=600)

    async def timed(tokens: int, delay: float) -> float:
        await asyncio.sleep(delay)
        start = time.perf_counter()
        await client.generate(
            PROMPT, max_new_tokens=tokens, adapter_id=adapter, adapter_source="local", ignore_eos_token=True
        )
        return time.perf_counter() - start

    long_s, short_s = await asyncio.gather(timed(long_tokens, 0.0), timed(short_tokens, 0.2))
    return {
        "long_tokens": long_tokens,
        "long_seconds": long_s,
        "short_tokens": short_tokens,
        "short_seconds": short_s,
        "short_over_long": short_s / long_s,
    }


def _resident(url: str) -> int:
    return json.loads(urllib.request.urlopen(f"{url}/info").read())["resident_lora_params"]


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def measure_serve(
    n_adapters: int = 16,
    new_tokens: int = 32,
    repeats: int = 5,
    hidden: int = 256,
    layers: int = 4,
    lora_rank: int = 16,
    rank: int = 16,
) -> dict:
    """Every case side by side against one backend: a dict with `cases` (label, requests, distinct adapters,
    tokens, seconds, tokens/s), the ratios, resident LoRA parameters and the short-during-long latency."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build_tiny_llama(tmp / "base", hidden=hidden, layers=layers)
        shapes = llama_module_shapes(hidden=hidden, layers=layers, targets=ATTENTION)
        facs = synthetic_factors(shapes, n_adapters, lora_rank, shared=lora_rank // 2, seed=1)
        names = [f"adapter-{i:02d}" for i in range(n_adapters)]
        for name, f in zip(names, facs):
            write_adapter(tmp / "adapters" / name, f, base_model=str(base), rank=lora_rank, alpha=2 * lora_rank)
        compress_folders([tmp / "adapters" / n for n in names], tmp / "adapters" / "jd", CompressConfig(rank=rank))
        compressed = [f"jd/{n}" for n in names]
        wide = 4 * lora_rank  # cores of rank k <= r / 4: stored (and applied) as two thin factors
        compress_folders([tmp / "adapters" / n for n in names], tmp / "adapters" / "jd-wide", CompressConfig(rank=wide))
        factored = [f"jd-wide/{n}" for n in names]
        square = [f"jd-square/{n}" for n in names]
        for n in names:
            _square_copy(tmp / "adapters" / "jd-wide" / n, tmp / "adapters" / "jd-square" / n)
        child = start_backend(
            str(base),
            extra=[
                "--adapter-dir",
                str(tmp / "adapters"),
                "--max-adapters",
                str(3 * n_adapters),
                "--max-batch-size",
                str(n_adapters),
                "--max-total-tokens",
                "512",
            ],
        )
        try:
            asyncio.run(_burst(child.url, names, 1))  # load every adapter once: measure decoding, not loading
            resident_orig = _resident(child.url)
            asyncio.run(_burst(child.url, compressed, 1))
            resident_jd = _resident(child.url) - resident_orig
            plan = [
                ("1 request, 1 adapter", [names[0]]),
                (f"{n_adapters} concurrent, base model only", [None] * n_adapters),
                (f"{n_adapters} concurrent, 1 adapter", [names[0]] * n_adapters),
                (f"{n_adapters} concurrent, {n_adapters} distinct adapters", names),
                (f"{n_adapters} concurrent, {n_adapters} JD-compressed (shared basis)", compressed),
                (f"{n_adapters} concurrent, {n_adapters} JD rank {wide}, factored cores", factored),
                (f"{n_adapters} concurrent, {n_adapters} JD rank {wide}, the same cores square", square),
            ]
            cases = []
            for label, adapters in plan:
                seconds, tokens = min(
                    (asyncio.run(_burst(child.url, adapters, new_tokens)) for _ in range(repeats)), key=lambda r: r[0]
                )
                cases.append(
                    {
                        "label": label,
                        "requests": len(adapters),
                        "distinct_adapters": len(set(adapters) - {None}),
                        "tokens": tokens,
                        "seconds": seconds,
                        "tokens_per_s": tokens / seconds,
                    }
                )
            latency = asyncio.run(_short_during_long(child.url, names[0]))
        finally:
            child.stop()
    one = cases[2]["tokens_per_s"]
    return {
        "workload": {
            "hidden": hidden,
            "layers": layers,
            "lora_rank": lora_rank,
            "targets": list(ATTENTION),
            "jd_rank": rank,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "device": "cpu",
        },
        "cases": cases,
        "distinct_over_one": cases[3]["tokens_per_s"] / one,
        "jd_over_one": cases[4]["tokens_per_s"] / one,
        "factored_over_square": cases[5]["tokens_per_s"] / cases[6]["tokens_per_s"],
        "resident_lora_params": {"originals": resident_orig, "jd_shared": resident_jd},
        "short_during_long": latency,
    }


def _square_copy(src: Path, dst: Path) -> None:
    """An output folder whose bundle holds the same cores as dense r x r matrices (format v1's layout)."""
    import shutil

    from soppu_hub.compression.bundle import FactoredCore, load_bundle, save_bundle
    from soppu_hub.peft_format.layout import BUNDLE_DIR

    shutil.copytree(src, dst)
    bundle = load_bundle(src / BUNDLE_DIR)
    for mb in bundle.modules.values():
        mb.cores = {i: c.matrix() if isinstance(c, FactoredCore) else c for i, c in mb.cores.items()}
    save_bundle(bundle, dst / BUNDLE_DIR)


def format_serve(m: dict) -> str:
    """The printed table of `measure_serve`'s result."""
    w, n = m["workload"], m["cases"][3]["requests"]
    rows = [(c["label"], str(c["tokens"]), f"{c['seconds']:.2f}", f"{c['tokens_per_s']:.1f}") for c in m["cases"]]
    header = ("case", "tokens", "seconds", "tokens/s")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(4)]
    lat, res = m["short_during_long"], m["resident_lora_params"]
    return "\n".join(
        [
            f"embedded backend (CPU), Llama hidden {w['hidden']}, {w['layers']} layers, LoRA r={w['lora_rank']} on "
            f"q/k/v/o, "
            f"{w['new_tokens']} new tokens per request, best of {w['repeats']}",
            *("  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in [header, *rows]),
            f"{n} distinct adapters: {m['distinct_over_one']:.2f}x the throughput of 1 adapter; "
            f"{n} JD-compressed: {m['jd_over_one']:.2f}x; at rank {4 * w['lora_rank']} factored cores run "
            f"{m['factored_over_square']:.2f}x as fast as the same cores square",
            f"a {lat['short_tokens']}-token request sent while a {lat['long_tokens']}-token one runs: "
            f"{lat['short_seconds']:.2f} s "
            f"of the long one's {lat['long_seconds']:.2f} s ({lat['short_over_long']:.2f})",
            f"resident LoRA parameters: {n} original adapters {res['originals']:,}; the same {n} JD-compressed at rank "
            f"{w['jd_rank']} through their shared basis {res['jd_shared']:,} "
            f"({res['originals'] / res['jd_shared']:.2f}x less)",
        ]
    )


def run_serve_bench(n_adapters: int = 16, new_tokens: int = 32, as_json: bool = False, **kw) -> str:
    m = measure_serve(n_adapters, new_tokens, **kw)
    return json.dumps(m, indent=2) if as_json else format_serve(m)
