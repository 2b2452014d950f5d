"""`python -m lab bench join`: a collection built from N adapters, then M more join it one by one (issue 21).

The scale bench's workload (rank-16 q/v LoRAs of 16 layers at Llama-3.2-1B shapes, bf16, 8 task families). The
first N are compressed as a collection and published to an offline Hub on loopback; each of the M joins then
runs with an empty Hub cache, so its downloaded bytes are what a fresh machine would fetch; the first few run as
the CLI (a user's wall time, interpreter and imports included), the rest as library calls in one process. An
adapter of a family the collection never saw must be refused. Then every member is made resident as `serve
--collection` does it (from the Hub, then from the cache). Last, all N + M are compressed together (the full
refit), and each joiner's error is compared with the error the refit gives it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab import ROOT

TOKEN = "hf_bench_join"
USER = "bench"
COLL = f"{USER}/collection"


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _child_main(job_file: str) -> None:
    """In a child with HF_ENDPOINT / HF_TOKEN set: build and publish, join, refit; print the rows as JSON."""
    import torch
    from huggingface_hub import constants

    from soppu_hub.collection.join import JoinSpec
    from soppu_hub.compression.config import CompressConfig
    from soppu_hub.compression.export import ExportConfig
    from soppu_hub.errors import CollectionError
    from soppu_hub.pipeline.job import JobSpec, run_job
    from soppu_hub.pipeline.join import run_join

    job = json.loads(Path(job_file).read_text())
    torch.set_num_threads(job["threads"])
    tmp, folders, n = Path(job["tmp"]), [Path(f) for f in job["folders"]], job["n_collection"]
    config = dict(rank=job["rank"], clusters=job["clusters"], device="cpu")
    store = ExportConfig(store=job["store"])  # the collection's store: a join downloads one cluster's bases in it
    t0 = time.perf_counter()
    # compressed and pushed as `compress --collection` does it: the collection, then every member's repo, --workers
    # at a time (the default)
    built = run_job(
        JobSpec(
            sources=[str(f) for f in folders[:n]],
            config=CompressConfig(**config),
            out=tmp / "built",
            push=True,
            namespace=USER,
            token=TOKEN,
            collection=COLL,
            export=store,
        )
    ).report
    build_s = time.perf_counter() - t0
    bases_bytes = [p.stat().st_size for p in sorted((tmp / "built" / "collection" / "clusters").glob("cluster-*"))]
    joins, refused = [], []
    for i, folder in enumerate(folders[n:]):
        cache = tmp / "caches" / f"join-{i}"
        constants.HF_HUB_CACHE = str(cache)  # read per call: every join starts from an empty cache
        t0 = time.perf_counter()
        try:
            r = run_join(JoinSpec(str(folder), COLL, token=TOKEN))
        except CollectionError as e:  # a refusal is a result too: counted, not a crash
            refused.append(str(e))
            continue
        joins.append(
            {
                "name": r.name,
                "seconds": time.perf_counter() - t0,
                "downloaded": _tree_bytes(cache),
                "adapter_bytes": _tree_bytes(folder),
                "cluster": r.cluster,
                "error": r.mean_rel_error,
            }
        )
    constants.HF_HUB_CACHE = str(tmp / "caches" / "unseen")
    try:
        run_join(JoinSpec(job["unseen"], COLL, token=TOKEN))
        unseen = "JOINED (wrong)"
    except CollectionError as e:
        unseen = str(e)
    from soppu_hub.serve.resident import load_resident

    resident = {}
    for label in ("from the Hub", "cached"):  # every member after the joins, as `serve --collection` loads them
        constants.HF_HUB_CACHE = str(tmp / "caches" / "resident")
        t0 = time.perf_counter()
        res = load_resident(COLL, token=TOKEN)
        resident[label] = {"seconds": time.perf_counter() - t0, "members": res.members, "bytes": res.nbytes()}
    t0 = time.perf_counter()
    refit = run_job(
        JobSpec(
            sources=[str(f) for f in folders],
            config=CompressConfig(**config),
            out=tmp / "refit",
            push=False,
            export=store,
        )
    ).report  # the same store: joined against refit, like for like
    refit_s = time.perf_counter() - t0
    refit_err = {a.name: a.mean_rel_error for a in refit.adapters}
    print(
        json.dumps(
            {
                "build_s": build_s,
                "clusters": len(built.clusters),
                "bases_bytes": bases_bytes,
                "joins": joins,
                "refused": refused,
                "unseen": unseen,
                "resident": resident,
                "refit_s": refit_s,
                "refit_error": {j["name"]: refit_err[j["name"]] for j in joins},
                "built_error": statistics.fmean(a.mean_rel_error for a in built.adapters),
            }
        )
    )


def run_join_bench(
    n_collection: int = 900,
    n_join: int = 100,
    *,
    rank: int = 24,
    clusters: str = "auto",
    cli_joins: int = 3,
    as_json: bool = False,
    store: str = "auto",
    log=lambda m: None,
) -> str:
    import torch

    from lab.bench.scale import LORA_RANK, SHAPES, write_workload
    from lab.samples import family_factors, write_adapter
    from soppu_hub.launch import start_hub

    with tempfile.TemporaryDirectory(prefix="soppu-bench-join-") as tmp:
        tmp = Path(tmp)
        log(f"writing {n_collection + n_join + cli_joins} adapters")
        folders, fams = write_workload(tmp / "in", n_collection + n_join + cli_joins)
        strange, _ = family_factors(SHAPES, 1, LORA_RANK, families=1, family_dim=16, noise=0.05, seed=99)
        unseen = write_adapter(
            tmp / "unseen",
            strange[0],
            base_model="meta-llama/Llama-3.2-1B",
            rank=LORA_RANK,
            alpha=LORA_RANK,
            dtype=torch.bfloat16,
        )
        hub = start_hub(tmp / "hub", {USER: TOKEN}, log=tmp / "hub.log")
        env = dict(
            os.environ,
            HF_ENDPOINT=hub.url,
            HF_TOKEN=TOKEN,
            HF_HOME=str(tmp / "hf"),
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
        )
        try:
            # the library joins (and the refit) cover folders[n : n + n_join]; the CLI joins come after them
            job = {
                "tmp": str(tmp),
                "folders": [str(f) for f in folders[: n_collection + n_join]],
                "unseen": str(unseen),
                "n_collection": n_collection,
                "rank": rank,
                "clusters": clusters,
                "threads": 2,
                "store": store,
            }
            (tmp / "job.json").write_text(json.dumps(job))
            log(f"building a collection of {n_collection}, then {n_join} joins and the refit (child process)")
            res = subprocess.run(
                [sys.executable, "-m", "lab.bench.join", str(tmp / "job.json")],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
            )
            if res.returncode != 0:
                raise RuntimeError(f"the bench child failed: {res.stderr.strip().splitlines()[-1:]}")
            out = json.loads(res.stdout.strip().splitlines()[-1])
            cli = []
            for folder in folders[n_collection + n_join :]:
                cache = tmp / "cli-caches" / folder.name
                t0 = time.perf_counter()
                r = subprocess.run(
                    [sys.executable, "-m", "soppu_hub", "join", str(folder), "--collection", COLL, "--quiet"],
                    capture_output=True,
                    text=True,
                    env=dict(env, HF_HUB_CACHE=str(cache)),
                )
                cli.append({"seconds": time.perf_counter() - t0, "downloaded": _tree_bytes(cache), "rc": r.returncode})
        finally:
            hub.stop()
    out["cli"] = cli
    out["store"] = store
    if as_json:
        return json.dumps(out, indent=1)
    return format_join(out, n_collection)


def format_join(out: dict, n_collection: int) -> str:
    joins, refused = out["joins"], out.get("refused", [])
    if not joins:
        return f"all {len(refused)} joins refused; the first: {refused[0][:200] if refused else 'none'}"
    secs = sorted(j["seconds"] for j in joins)
    ratio = [j["error"] / out["refit_error"][j["name"]] for j in joins]
    budget = [max(out["bases_bytes"]) + j["adapter_bytes"] for j in joins]
    rows = [
        (
            "collection",
            f"{n_collection} adapters, {out['clusters']} clusters, built and pushed (collection + member repos) in "
            f"{out['build_s']:.1f} s; one cluster's bases {max(out['bases_bytes']) / 1e6:.2f} MB "
            f"(store {out.get('store', 'auto')})",
        ),
        (
            "joins (library call)",
            f"{len(joins)} landed, {len(refused)} refused; median {statistics.median(secs):.2f} s, "
            f"p90 {secs[int(0.9 * (len(secs) - 1))]:.2f} s, max {secs[-1]:.2f} s (goal <= 5 s)",
        ),
        (
            "joins (CLI, interpreter and imports included)",
            ", ".join(f"{c['seconds']:.1f} s" + ("" if c["rc"] == 0 else f" (exit {c['rc']})") for c in out["cli"])
            or "none",
        ),
        (
            "downloaded per join",
            f"max {max(j['downloaded'] for j in joins) / 1e6:.2f} MB; within one cluster's bases + the "
            f"adapter: {sum(j['downloaded'] <= b for j, b in zip(joins, budget))}/{len(joins)}",
        ),
        (
            "error, joined / full refit of all",
            f"mean {statistics.fmean(ratio):.3f}x, worst {max(ratio):.3f}x (goal <= 1.1x); "
            f"joined mean error {statistics.fmean(j['error'] for j in joins):.4f}",
        ),
        ("full refit", f"{n_collection + len(joins) + len(refused)} adapters in {out['refit_s']:.1f} s"),
        *(
            (
                f"all members resident ({label})",
                f"{r['members']} in {r['seconds']:.1f} s, {r['bytes'] / 1e6:.1f} MB "
                "(bases once per cluster + cores; goal <= 30 s)",
            )
            for label, r in out.get("resident", {}).items()
        ),
        (
            "an adapter of a family never seen",
            "refused: " + out["unseen"][:160] if not out["unseen"].startswith("JOINED") else "JOINED (goal: refused)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


if __name__ == "__main__":
    _child_main(sys.argv[1])
