"""`soppu-hub bench serve`: throughput of the embedded backend, one adapter vs many distinct adapters."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import urllib.request
from pathlib import Path

from ..compress import CompressConfig
from ..job import compress_folders
from ..launch import start_backend
from ..samples import build_tiny_llama, llama_module_shapes, synthetic_factors, write_adapter

PROMPT = "Hello! How are you today?"


async def _burst(url: str, adapters: list[str | None], new_tokens: int) -> tuple[float, int]:
    from lorax import AsyncClient

    client = AsyncClient(url, timeout=600)
    start = time.perf_counter()
    results = await asyncio.gather(*[
        client.generate(PROMPT, max_new_tokens=new_tokens, adapter_id=a, adapter_source="local", ignore_eos_token=True,
                        details=True)
        for a in adapters
    ])
    seconds = time.perf_counter() - start
    return seconds, sum(r.details.generated_tokens for r in results)


def _resident(url: str) -> int:
    return json.loads(urllib.request.urlopen(f"{url}/info").read())["resident_lora_params"]


def run_serve_bench(n_adapters: int = 20, new_tokens: int = 32, repeats: int = 2, hidden: int = 64, rank: int = 16) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build_tiny_llama(tmp / "base", hidden=hidden)
        facs = synthetic_factors(llama_module_shapes(hidden=hidden), n_adapters, 8, shared=4, seed=1)
        names = [f"adapter-{i:02d}" for i in range(n_adapters)]
        for name, f in zip(names, facs):
            write_adapter(tmp / "adapters" / name, f, base_model=str(base), rank=8, alpha=16)
        compress_folders([tmp / "adapters" / n for n in names], tmp / "adapters" / "jd", CompressConfig(rank=rank))
        compressed = [f"jd/{n}" for n in names]
        child = start_backend(str(base), extra=["--adapter-dir", str(tmp / "adapters"), "--max-adapters", str(3 * n_adapters),
                                                "--max-batch-size", str(n_adapters), "--max-total-tokens", "512"])
        try:
            asyncio.run(_burst(child.url, names, 1))  # load every adapter once: measure decoding, not loading
            resident_orig = _resident(child.url)
            asyncio.run(_burst(child.url, compressed, 1))
            resident_jd = _resident(child.url) - resident_orig
            cases = {
                "1 request, 1 adapter": [names[0]],
                f"{n_adapters} concurrent, base model only": [None] * n_adapters,
                f"{n_adapters} concurrent, 1 adapter": [names[0]] * n_adapters,
                f"{n_adapters} concurrent, {n_adapters} distinct adapters": names,
                f"{n_adapters} concurrent, {n_adapters} JD-compressed (shared basis)": compressed,
            }
            rows = []
            for label, adapters in cases.items():
                best = min((asyncio.run(_burst(child.url, adapters, new_tokens)) for _ in range(repeats)), key=lambda r: r[0])
                rows.append((label, f"{best[1]}", f"{best[0]:.2f}", f"{best[1] / best[0]:.1f}"))
        finally:
            child.stop()
    one, many = float(rows[2][3]), float(rows[3][3])
    header = ("case", "tokens", "seconds", "tokens/s")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(4)]
    lines = [f"embedded backend (CPU), tiny Llama hidden {hidden}, {new_tokens} new tokens per request, best of {repeats}",
             *("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]),
             f"{n_adapters} distinct adapters run at {many / one:.2f}x the throughput of 1 adapter",
             f"resident LoRA parameters: {n_adapters} original adapters {resident_orig:,}; the same {n_adapters} "
             f"JD-compressed at rank {rank} through their shared basis {resident_jd:,} ({resident_orig / resident_jd:.2f}x less)"]
    return "\n".join(lines)
