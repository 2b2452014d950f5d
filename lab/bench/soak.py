"""`python -m lab bench soak --minutes 10`: one backend under minutes of traffic, and whether it drifts.

The server holds a resident collection of N members (the tiny Llama and synthetic adapters of `bench serve`) and
serves N/10 more plain adapters from disk under `--max-lora-memory` (room for a few: they keep loading and
evicting). A Poisson stream (fixed seed) names a member 4 times in 5 and a plain adapter otherwise; one request in
ten is a client that leaves after its first token. Reported, as measured: the server's RSS after the warm-up
minute and at the end, tokens/s in the first and the last minute after warm-up, and how every request ended
(answered, refused in words: 429 / 422 / 424, or unanswered: a timeout or a dropped connection).
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
import urllib.request
from pathlib import Path

from lab.bench.serve_load import PROMPT, TARGETS, build_workload

WARMUP_S = 60.0


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _traffic(url: str, plan: list[tuple[float, str, str, bool]], timeout: float) -> list[dict]:
    """Each (arrival s, adapter id, source, leaves early) as a request; how each ended and when its tokens came."""
    from lorax import AsyncClient
    from lorax.errors import (
        GenerationError,
        OverloadedError,
        RateLimitExceededError,
        UnprocessableEntityError,
        ValidationError,
    )

    client = AsyncClient(url, timeout=timeout)
    start = time.perf_counter()

    async def one(at: float, adapter: str, source: str, leaves: bool) -> dict:
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
        stamps: list[float] = []
        stream = client.generate_stream(PROMPT, max_new_tokens=16, adapter_id=adapter, adapter_source=source)
        try:
            async for r in stream:
                if not r.token.special:
                    stamps.append(time.perf_counter() - start)
                if leaves:
                    break
            took = time.perf_counter() - start - at
            return {"end": "left" if leaves else "answered", "stamps": stamps, "at": at, "took": took}
        except (
            OverloadedError,
            RateLimitExceededError,
            ValidationError,
            UnprocessableEntityError,
            GenerationError,
        ) as e:
            return {"end": "refused", "why": str(e).splitlines()[0], "stamps": stamps}
        except Exception as e:  # noqa: BLE001 - anything else is a request nobody answered: counted, said
            return {"end": "unanswered", "why": f"{type(e).__name__}: {e}"[:200], "stamps": stamps}
        finally:
            await stream.aclose()

    return await asyncio.gather(*[one(*p) for p in plan])


def measure_soak(
    *, minutes: float = 10.0, members: int = 1000, rate: float = 8.0, seed: int = 0, log=lambda m: None
) -> dict:
    from lab.samples import family_factors, llama_module_shapes, write_adapter
    from soppu_hub.launch import start_backend
    from soppu_hub.serve.adapters import lora_bytes

    with tempfile.TemporaryDirectory(prefix="soppu-bench-soak-") as tmp:
        tmp = Path(tmp)
        base, names = build_workload(tmp, members, hidden=256, layers=4, lora_rank=16, rank=16, log=log)
        shapes = llama_module_shapes(hidden=256, layers=4, targets=TARGETS)
        plain = [f"plain-{i:03d}" for i in range(max(1, members // 10))]
        facs, _ = family_factors(shapes, len(plain), 16, families=8, noise=0.05, seed=2, offset=members)
        for name, f in zip(plain, facs):
            write_adapter(tmp / "plain" / name, f, base_model=str(base), rank=16, alpha=32)
        bound = 4 * lora_bytes(tmp / "plain" / plain[0])  # room for about four plain adapters at once
        flags = f"--adapter-dir {tmp / 'plain'} --max-lora-memory {bound} --max-adapters 1000000 --max-batch-size 16"
        extra = ["--collection", str(tmp / "jd" / "collection"), *flags.split(), "--max-concurrent-requests", "256"]
        server = start_backend(
            str(base),
            extra=extra,
            timeout=900,
        )
        try:
            rng = random.Random(seed)
            t, plan, total = 0.0, [], minutes * 60
            while True:
                t += rng.expovariate(rate)
                if t >= total:
                    break
                member = rng.random() < 0.8
                adapter = rng.choice(names) if member else rng.choice(plain)
                plan.append((t, adapter, "hub" if member else "local", rng.random() < 0.1))
            log(f"{len(plan)} requests over {minutes:g} min at {rate:g}/s against {server.url}")
            rss: list[tuple[float, int]] = []
            done = False

            async def sample() -> None:
                start = time.perf_counter()
                while not done:
                    rss.append((time.perf_counter() - start, _rss_kb(server.proc.pid)))
                    await asyncio.sleep(5.0)

            async def main() -> list[dict]:
                nonlocal done
                sampler = asyncio.ensure_future(sample())
                try:
                    return await _traffic(server.url, plan, timeout=120)
                finally:
                    done = True
                    await sampler

            results = asyncio.run(main())
            info = json.loads(urllib.request.urlopen(f"{server.url}/info").read())
        finally:
            server.stop()
    warm = next(kb for s, kb in rss if s >= WARMUP_S)
    end = rss[-1][1]
    last = max(s for r in results for s in r["stamps"])

    def rate_in(lo: float, hi: float) -> float:
        return sum(lo <= s < hi for r in results for s in r["stamps"]) / (hi - lo)

    ends = {k: sum(r["end"] == k for r in results) for k in ("answered", "left", "refused", "unanswered")}

    def p50_latency(lo: float, hi: float) -> float | None:
        took = sorted(r["took"] for r in results if r["end"] == "answered" and lo <= r["at"] < hi)
        return took[len(took) // 2] if took else None

    return {
        "workload": {
            "minutes": minutes,
            "members": members,
            "plain_adapters": len(plain),
            "max_lora_memory": bound,
            "rate": rate,
            "requests": len(plan),
            "leave_early": sum(p[3] for p in plan),
            "seed": seed,
        },
        "rss_kb": {"after_warmup": warm, "end": end, "drift": end / warm - 1, "samples": rss},
        "tokens_per_s": {
            "first_minute": rate_in(WARMUP_S, WARMUP_S + 60),
            "last_minute": rate_in(last - 60, last),
        },
        "latency_p50_s": {
            "first_minute": p50_latency(WARMUP_S, WARMUP_S + 60),
            "last_minute": p50_latency(minutes * 60 - 60, minutes * 60),
        },
        "ends": ends,
        "refusals": sorted({r["why"] for r in results if r["end"] in ("refused", "unanswered")})[:10],
        "requests_cancelled": info.get("requests_cancelled"),
        "plain_loaded_at_end": len(info.get("loaded_adapters", [])),
    }


def format_soak(m: dict) -> str:
    w, rss, tps, ends = m["workload"], m["rss_kb"], m["tokens_per_s"], m["ends"]
    drift_tps = tps["last_minute"] / tps["first_minute"] - 1 if tps["first_minute"] else float("nan")
    rows = [
        (
            "workload",
            f"{w['members']} resident members + {w['plain_adapters']} plain adapters under "
            f"--max-lora-memory {w['max_lora_memory']:,} B; {w['requests']} requests over {w['minutes']:g} min at "
            f"{w['rate']:g}/s, {w['leave_early']} leaving after their first token",
        ),
        (
            "RSS after warm-up -> end",
            f"{rss['after_warmup'] / 1024:.0f} -> {rss['end'] / 1024:.0f} MiB ({rss['drift']:+.1%}; goal within 10%)",
        ),
        (
            "tokens/s, first -> last minute",
            f"{tps['first_minute']:.1f} -> {tps['last_minute']:.1f} ({drift_tps:+.1%}; goal within 10%)",
        ),
        (
            "p50 latency, first -> last minute",
            f"{m['latency_p50_s']['first_minute']:.2f} -> {m['latency_p50_s']['last_minute']:.2f} s",
        ),
        ("how requests ended", ", ".join(f"{v} {k}" for k, v in ends.items()) + " (goal: 0 unanswered)"),
        ("requests the server cancelled (clients gone)", str(m["requests_cancelled"])),
    ]
    width = max(len(k) for k, _ in rows)
    out = [f"{k.ljust(width)}  {v}" for k, v in rows]
    out += [f"  refused or unanswered: {why}" for why in m["refusals"]]
    return "\n".join(out)


def run_soak_bench(*, as_json: bool = False, **kw) -> str:
    m = measure_soak(**kw)
    return json.dumps(m, indent=1) if as_json else format_soak(m)
