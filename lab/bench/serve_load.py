"""`python -m lab bench serve --adapters 1,16,64,256,1000 --requests R`: throughput as distinct adapters grow.

The Compress-then-Serve paper's figure, on CPU: a Poisson stream of R requests (fixed seed), each naming one of
the first N adapters (uniform, or Zipf with exponent --zipf), served by
  (a) the JD collection of all the adapters, every member resident (`serve --collection`);
  (b) the same adapters as plain PEFT folders, loaded from disk on demand under `--max-lora-memory` equal to
      (a)'s resident LoRA bytes (LRU), as a server with that memory budget would; raised to the largest adapter's
      LoRA bytes where one alone needs more (the real collection's can), and the table says so;
  (c) one plain adapter for every request (the reference).
Each case runs its stream once unmeasured, then `repeats` times, each pass right after a pass of the reference, and
reports the median pass and the median reference beside it (steady state: what fits the bound is loaded, as on a
server that has run a while; what does not fit keeps loading and evicting; the reference beside each pass cancels
most of this machine's drift). It reports tokens/s (all generated tokens over the time from the first arrival to
the last token), time to first token and p50/p99 latency (from each request's arrival), and the table, JSON and a
PNG of tokens/s against N follow. Both servers run side by side in one run, on the same base and adapters: the tiny
Llama and
synthetic adapters of 8 task families by default, or with `--model real` the real base (SmolLM2-135M-Instruct,
from its wheel) and the real collection's adapters.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from lab.bench.serve_load_report import format_load, plot_load

PROMPT = "Hello! How are you today?"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
COLLECTION = "bench/serve"


def arrivals(
    n_requests: int, rate: float, n_adapters: int, *, zipf: float | None, seed: int
) -> list[tuple[float, int]]:
    """(arrival time in s, adapter index) per request: Poisson arrivals at `rate` per second; adapters uniform, or
    Zipf-distributed popularity (index 0 the most popular) when `zipf` is given."""
    g = torch.Generator().manual_seed(seed)
    gaps = torch.empty(n_requests, dtype=torch.float64).exponential_(rate, generator=g)
    if zipf:
        weights = 1.0 / torch.arange(1, n_adapters + 1, dtype=torch.float64) ** zipf
        picks = torch.multinomial(weights, n_requests, replacement=True, generator=g)
    else:
        picks = torch.randint(n_adapters, (n_requests,), generator=g)
    return list(zip(torch.cumsum(gaps, 0).tolist(), picks.tolist()))


async def _run(url: str, plan: list[tuple[float, str | None]], new_tokens: int) -> dict:
    from lorax import AsyncClient

    client = AsyncClient(url, timeout=3600)
    start = time.perf_counter()

    async def one(at: float, adapter: str | None) -> tuple[float, float, float, int]:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
        sent = time.perf_counter()
        first, tokens = None, 0
        async for r in client.generate_stream(
            PROMPT, max_new_tokens=new_tokens, adapter_id=adapter, adapter_source="local", ignore_eos_token=True
        ):
            if not r.token.special:
                tokens += 1
            first = first or time.perf_counter()
        done = time.perf_counter()
        return first - sent, done - sent, done - start, tokens

    rows = await asyncio.gather(*[one(at, a) for at, a in plan])
    ttft, latency = sorted(r[0] for r in rows), sorted(r[1] for r in rows)
    wall = max(r[2] for r in rows) - plan[0][0]
    tokens = sum(r[3] for r in rows)

    def pct(xs: list[float], p: float) -> float:
        return xs[min(len(xs) - 1, int(p * len(xs)))]

    return {
        "requests": len(plan),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50": statistics.median(ttft),
        "latency_p50": statistics.median(latency),
        "latency_p99": pct(latency, 0.99),
    }


def _info(url: str) -> dict:
    return json.loads(urllib.request.urlopen(f"{url}/info").read())


def _shapes(base: Path, adapters: list[Path]) -> dict:
    """What the workload is, read off its files: the real base and adapters are not the tiny defaults (the real
    adapters mix ranks and target modules)."""
    from soppu_hub.peft_format.layout import CONFIG_NAME

    cfg = json.loads((base / "config.json").read_text())
    confs = [json.loads((a / CONFIG_NAME).read_text()) for a in adapters]
    targets = {
        t
        for c in confs
        for t in ([c["target_modules"]] if isinstance(c["target_modules"], str) else c["target_modules"])
    }
    return {
        "hidden": cfg["hidden_size"],
        "layers": cfg["num_hidden_layers"],
        "targets": sorted(targets),
        "lora_ranks": sorted({c["r"] for c in confs}),
    }


def _compress(tmp: Path, names: list[str], rank: int, store: str) -> None:
    """The workload's adapters as the collection the JD server holds (tmp/jd)."""
    from soppu_hub.compression.config import CompressConfig
    from soppu_hub.compression.export import ExportConfig
    from soppu_hub.pipeline.job import JobSpec, run_job

    run_job(
        JobSpec(
            sources=[str(tmp / "adapters" / m) for m in names],
            config=CompressConfig(rank=rank, clusters="auto"),
            out=tmp / "jd",
            push=False,
            collection=COLLECTION,
            export=ExportConfig(store=store),
        )
    )


def build_workload(
    tmp: Path, n: int, *, hidden: int, layers: int, lora_rank: int, rank: int, log, store: str = "auto"
) -> tuple[Path, list[str]]:
    """The tiny base, n plain adapters (bf16 files, 8 task families) and their collection (`compress --collection`)."""
    from lab.samples import build_tiny_llama, family_factors, llama_module_shapes, write_adapter

    base = build_tiny_llama(tmp / "base", hidden=hidden, layers=layers)
    shapes = llama_module_shapes(hidden=hidden, layers=layers, targets=TARGETS)
    names = [f"lora-{i:04d}" for i in range(n)]
    log(f"writing {n} adapters")
    for start in range(0, n, 100):  # in batches: all factors of 1000 adapters at once would be gigabytes
        facs, _ = family_factors(shapes, min(100, n - start), lora_rank, families=8, noise=0.05, seed=1, offset=start)
        for name, f in zip(names[start:], facs):
            write_adapter(
                tmp / "adapters" / name,
                f,
                base_model=str(base),
                rank=lora_rank,
                alpha=2 * lora_rank,
                dtype=torch.bfloat16,
            )
    log(f"compressing them as a collection (rank {rank}, clusters auto, store {store})")
    _compress(tmp, names, rank, store)
    return base, names


def real_workload(tmp: Path, *, rank: int, log, store: str = "auto") -> tuple[Path, list[str]]:
    """The real base (SmolLM2-135M-Instruct from its wheel) and the real collection's adapters, compressed as a
    collection. The copies name the converted base folder as their base model, which this server runs."""
    import shutil

    from lab.collection.build import COLLECTION as REAL
    from lab.realbase import real_base
    from soppu_hub.peft_format.layout import CONFIG_NAME

    base = real_base()
    names = sorted(p.name for p in (REAL / "adapters").iterdir() if (p / CONFIG_NAME).is_file())
    for name in names:
        dst = tmp / "adapters" / name
        shutil.copytree(REAL / "adapters" / name, dst, ignore=shutil.ignore_patterns("README.md", "*.png"))
        config = json.loads((dst / CONFIG_NAME).read_text())
        (dst / CONFIG_NAME).write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    log(
        f"compressing the real collection's {len(names)} adapters as a collection (rank {rank}, clusters auto, store "
        f"{store})"
    )
    _compress(tmp, names, rank, store)
    return base, names


def measure_load(
    counts: list[int],
    n_requests: int,
    *,
    new_tokens: int = 16,
    rate: float = 200.0,
    zipf: float | None = None,
    hidden: int = 256,
    layers: int = 4,
    lora_rank: int = 16,
    rank: int = 16,
    seed: int = 0,
    real: bool = False,
    repeats: int = 1,
    store: str = "auto",
    log=lambda m: None,
) -> dict:
    """Every case against two servers started side by side. `real`: the real base and its real collection, the
    counts cut to the adapters it has. `store`: how the collection is kept (--store-dtype; a quantized one stays its
    codes in the server's memory)."""
    from soppu_hub.launch import start_backend
    from soppu_hub.serve.adapters import lora_bytes

    common = ["--max-batch-size", "16", "--max-total-tokens", "512", "--max-concurrent-requests", "1000000"]
    with tempfile.TemporaryDirectory(prefix="soppu-bench-serve-") as tmp:
        tmp = Path(tmp)
        if real:
            base, names = real_workload(tmp, rank=rank, log=log, store=store)
            counts = sorted({min(n, len(names)) for n in counts})
        else:
            base, names = build_workload(
                tmp, max(counts), hidden=hidden, layers=layers, lora_rank=lora_rank, rank=rank, log=log, store=store
            )
        t0 = time.perf_counter()
        jd = start_backend(str(base), extra=["--collection", str(tmp / "jd" / "collection"), *common], timeout=900)
        jd_start_s = time.perf_counter() - t0
        plain = None
        try:
            info = _info(jd.url)
            jd_bytes = info["resident_collection"]["bytes"] + info["resident_lora_bytes"]
            largest = max(lora_bytes(tmp / "adapters" / name) for name in names[: max(counts)])
            bound = max(jd_bytes, largest)  # a plain server must hold at least one adapter
            plain = start_backend(
                str(base),
                extra=[
                    "--adapter-dir",
                    str(tmp / "adapters"),
                    "--max-adapters",
                    "1000000",
                    "--max-lora-memory",
                    str(bound),
                    *common,
                ],
            )
            rows = []
            ref_plan = [(at, names[0]) for at, _ in arrivals(n_requests, rate, 1, zipf=None, seed=seed)]
            for url in (plain.url, jd.url):  # warm both up with a whole run (discarded): the first is slower
                asyncio.run(_run(url, ref_plan, new_tokens))

            def measured(url: str, plan: list, *, beside_ref: bool = True) -> dict:
                """The median of `repeats` passes, each right after a pass of the reference (this machine drifts by
                +-20 % within minutes: a ratio against the reference measured beside it cancels most of that)."""
                runs, refs = [], []
                for _ in range(repeats):
                    if beside_ref:
                        refs.append(asyncio.run(_run(plain.url, ref_plan, new_tokens))["tokens_per_s"])
                    runs.append(asyncio.run(_run(url, plan, new_tokens)))
                runs.sort(key=lambda r: r["tokens_per_s"])
                return {
                    **runs[len(runs) // 2],
                    "runs_tokens_per_s": [r["tokens_per_s"] for r in runs],
                    **({"ref_tokens_per_s": statistics.median(refs), "ref_runs_tokens_per_s": refs} if refs else {}),
                }

            rows.append(
                {
                    "method": "one plain adapter (reference)",
                    "adapters": 1,
                    **measured(plain.url, ref_plan, beside_ref=False),
                }
            )
            log(f"reference: {rows[-1]['tokens_per_s']:.1f} tokens/s")
            for n in counts:
                plan = arrivals(n_requests, rate, n, zipf=zipf, seed=seed + n)
                for method, url in (
                    ("JD collection, all resident", jd.url),
                    ("plain PEFT under --max-lora-memory", plain.url),
                ):
                    case = [(at, names[i]) for at, i in plan]
                    asyncio.run(
                        _run(url, case, new_tokens)
                    )  # steady state: what fits is loaded by a first pass, discarded
                    row = {"method": method, "adapters": n, **measured(url, case)}
                    rows.append(row)
                    log(f"{method}, {n} adapters: {row['tokens_per_s']:.1f} tokens/s")
            # the reference again at the end: the same case twice shows this machine's drift; ratios use the better
            rows.append(
                {
                    "method": "one plain adapter (reference, again)",
                    "adapters": 1,
                    **measured(plain.url, ref_plan, beside_ref=False),
                }
            )
            plain_info = _info(plain.url)
        finally:
            jd.stop()
            if plain is not None:
                plain.stop()
        shapes = _shapes(base, [tmp / "adapters" / name for name in names[: max(counts)]])
    return {
        "workload": {
            "model": "SmolLM2-135M-Instruct (real collection)" if real else "Llama (tiny, built offline)",
            **shapes,
            "jd_rank": rank,
            "requests": n_requests,
            "rate": rate,
            "zipf": zipf,
            "new_tokens": new_tokens,
            "seed": seed,
            "repeats": repeats,
            "device": "cpu",
            "adapters_written": max(counts),
        },
        "jd": {
            "members": info["resident_collection"]["members"],
            "resident_bytes": jd_bytes,
            "start_s": jd_start_s,
            "store": store,
            "collection_bytes": info["resident_collection"]["bytes"],
        },
        "plain_bound_bytes": bound,
        "largest_adapter_bytes": largest,
        "plain_loaded_at_end": len(plain_info["loaded_adapters"]),
        "rows": rows,
    }


def run_load_bench(counts: list[int], n_requests: int, *, as_json: bool = False, plot: str | None = None, **kw) -> str:
    m = measure_load(counts, n_requests, **kw)
    if plot:
        plot_load(m, plot)
    return json.dumps(m, indent=1) if as_json else format_load(m)
