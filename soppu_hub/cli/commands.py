"""What each subcommand does: call the library, print the result. The library is imported where a command needs it."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from ..errors import ConfigError, SoppuError
from ..peft_format.layout import BASE_MODEL_ID
from ..progress import ProgressBar, log_above_bars
from .flags import command_line, job_spec


def cmd_compress(args: argparse.Namespace) -> int:
    from ..compression.report import format_table
    from ..pipeline.job import run_job

    spec = job_spec(args)
    if args.author:
        from ..hub.pull import list_adapter_repos

        spec.sources += list_adapter_repos(args.author, base_model=args.base_model, token=args.token, workers=args.workers)
    members = None
    if spec.refit:
        from ..pipeline.refit import refit_spec

        spec, members = refit_spec(spec)
    if not spec.sources:
        raise SoppuError("no adapters given: name folders or repo ids, or pass --sources-file FILE or --author USER")
    bars = {phase: ProgressBar(phase, unit) for phase, unit in
            (("downloading", "repo"), ("compressing", "module"), ("verifying", "adapter"), ("cards", "card"),
             ("pushing", "repo"))}
    log = (lambda msg: None) if args.quiet else log_above_bars
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hub_bars = not are_progress_bars_disabled()
    if args.quiet:  # huggingface_hub's own per-file bars (snapshot downloads, uploads) too
        disable_progress_bars()
    shown = {k: None if args.quiet else b for k, b in bars.items()}
    try:
        result = run_job(spec, progress=shown["compressing"], log=log, cards_progress=shown["cards"],
                         download_progress=shown["downloading"], push_progress=shown["pushing"],
                         verify_progress=shown["verifying"])
    finally:
        for b in bars.values():
            b.close()
        if hub_bars:
            enable_progress_bars()
    if not args.quiet:
        print(format_table(result.report))
        if result.out:
            print(f"results: {result.out} (cards: {result.out}/<name>/README.md)")
        for repo_id, url in result.pushed.items():
            print(f"unchanged {repo_id} (already on the Hub)" if url == "unchanged" else f"pushed {repo_id}: {url}")
    if members is not None and not args.quiet:
        from ..pipeline.refit import drift, format_drift

        print(format_drift(drift(members, result.report)))
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    from ..collection.join import FLAGS as names
    from ..collection.join import JoinSpec
    from ..compression.export import ExportConfig
    from ..pipeline.join import run_join

    spec = JoinSpec(args.source, args.collection, out=Path(args.out) if args.out else None, push=not args.no_push,
                    export=ExportConfig(pad=args.pad, lorax_tp=args.lorax_tp, dtype=args.dtype),
                    command=command_line(args.argv), **{n: getattr(args, n) for n in names})
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    r = run_join(spec, log=log)
    if not args.quiet:
        where = r.repo_id or r.out
        print(f"{r.name}: joined {args.collection} as {'a new cluster ' + str(r.cluster) if r.how == 'new-cluster' else f'cluster {r.cluster}'}, "
              f"mean relative error {r.mean_rel_error:.4f} (worst module {r.max_rel_error:.4f}); member repo: {where}")
    return 0


def _count(args: argparse.Namespace, default: int) -> int:
    try:
        return int(args.adapters) if args.adapters else default
    except ValueError:
        raise ConfigError(f"--adapters {args.adapters!r}: give one number of adapters for bench {args.what}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "samples":
        from ..devtools.bench.samples import RANKS, run_samples_bench

        ranks = tuple(int(r) for r in args.ranks.split(",")) if args.ranks else RANKS
        print(run_samples_bench(ranks, plot=args.plot))
        return 0
    if args.what == "quality":
        from ..devtools.bench.quality import RANKS, SVD_RANKS, run_quality_bench

        ranks = tuple(int(r) for r in args.ranks.split(",")) if args.ranks else RANKS
        svd_ranks = tuple(int(r) for r in args.svd_ranks.split(",")) if args.svd_ranks else SVD_RANKS
        print(run_quality_bench(ranks=ranks, svd_ranks=svd_ranks, as_json=args.json, plot=args.plot,
                                log=lambda m: print(m, file=sys.stderr, flush=True)))
        return 0
    if args.what == "join":
        from ..devtools.bench.join import run_join_bench

        print(run_join_bench(_count(args, 900), args.joins, rank=args.rank, clusters=args.clusters, as_json=args.json,
                             store=args.store_dtype,
                             log=lambda m: print(m, file=sys.stderr, flush=True)))
        return 0
    if args.what == "peers":
        from ..devtools.bench.peers import run_peers_bench

        print(run_peers_bench(_count(args, 32), as_json=args.json, plot=args.plot,
                              log=lambda m: print(m, file=sys.stderr, flush=True)))
        return 0
    if args.what == "scale":
        from ..devtools.bench.scale import run_scale_bench

        print(run_scale_bench(n_adapters=_count(args, 20), rank=args.rank, clusters=args.clusters, device=args.device,
                              per_family=not args.no_per_family))
        return 0
    if args.what == "serve" and (args.requests or "," in (args.adapters or "") or args.model == "real"):
        from ..devtools.bench.serve_load import run_load_bench

        try:
            counts = sorted({int(n) for n in args.adapters.split(",")}) if args.adapters else [1, 16, 64, 256, 1000]
        except ValueError:
            raise ConfigError(f"--adapters {args.adapters!r}: give comma-separated counts, e.g. 1,16,64,256,1000") from None
        print(run_load_bench(counts, args.requests or 200, as_json=args.json, plot=args.plot, rate=args.rate, zipf=args.zipf,
                             new_tokens=args.new_tokens or 16, seed=args.seed, real=args.model == "real", repeats=max(1, args.repeats),
                             store=args.store_dtype,
                             log=lambda m: print(m, file=sys.stderr, flush=True)))
        return 0
    if args.what == "serve":
        from ..devtools.bench.serve import run_serve_bench

        print(run_serve_bench(n_adapters=_count(args, 16), new_tokens=args.new_tokens or 32, as_json=args.json))
        return 0
    from ..devtools.bench.kernel import run_kernel_bench

    print(run_kernel_bench(layers=args.layers, ref_layers=args.ref_layers, device=args.device, seed=args.seed))
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_demo(args: argparse.Namespace) -> int:
    import signal

    from ..devtools.demo import run_demo

    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the demo's servers as Ctrl-C does
    # a shell's background job starts with SIGINT ignored, and Python then leaves it ignored: Ctrl-C (or kill -INT)
    # would do nothing. The demo always stops on it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run_demo(Path(args.workdir), demo_set=args.set_name, log=print, serve=not args.no_serve)
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    from ..devtools.samples.collection import BuildConfig, build_collection, load_collection

    if args.action == "real-base":
        from ..devtools.realbase import REAL_BASE_ID, real_base

        print(f"{REAL_BASE_ID}: {real_base()}")
        return 0
    if args.action == "check":
        c = load_collection(args.out)
        print(f"{c.folder}: {len(c.adapters)} adapters for {c.manifest['base_model']}, every file matches manifest.json")
        return 0
    config = BuildConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BuildConfig)})
    bar = ProgressBar("training", "step")
    try:
        c = build_collection(args.out, config, progress=bar, log=lambda m: print(m, file=sys.stderr))
    finally:
        bar.close()
    print(f"sample collection: {c.folder} ({len(c.adapters)} adapters; check it with soppu-hub samples check)")
    return 0


def cmd_collection(args: argparse.Namespace) -> int:
    from ..devtools.collection.build import COLLECTION, build_collection, format_collection, read_manifest

    if args.action == "show":
        print(format_collection(read_manifest(Path(args.out or COLLECTION))))
        return 0
    manifest = build_collection(args.out or COLLECTION, args.base, only=args.only or None,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"real collection: {len(manifest['adapters'])} adapters in {args.out or COLLECTION}")
    return 0


def cmd_hub(args: argparse.Namespace) -> int:
    from ..hubserver import load_auth, serve

    auth = load_auth(args.user, args.org, args.users_file)
    print(f"offline Hub on http://{args.host}:{args.port} (data in {args.root}); use HF_ENDPOINT=http://{args.host}:{args.port}",
          flush=True)
    serve(args.root, auth, host=args.host, port=args.port, max_commit_bytes=int(args.max_commit_mb * 2**20))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve import build_engine, serve

    engine = build_engine(args.model, max_adapters=args.max_adapters, max_batch=args.max_batch_size,
                          max_total_tokens=args.max_total_tokens, max_concurrent_requests=args.max_concurrent_requests,
                          adapter_dir=args.adapter_dir, share_bases=not args.no_shared_bases,
                          max_lora_bytes=args.max_lora_memory, collection=args.collection, preload=args.preload)
    print(f"serving {args.model} (LoRAX API) on http://{args.host}:{args.port}", flush=True)
    serve(engine, host=args.host, port=args.port)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from ..clients import GenerationSettings, connect

    client = connect(args.url, api=args.api, auth_token=args.auth_token or os.environ.get("LORAX_API_TOKEN"))
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    adapter = None if args.adapter in ("", "-", BASE_MODEL_ID) else args.adapter
    client.check()  # fail early, before the first prompt, if the backend is not there
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    print(f"chatting with {adapter or 'the base model'} on {client.model_id} at {args.url}; Ctrl-D or /exit ends",
          file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        print("bot> " if interactive else "", end="", flush=True)
        reply = []
        for piece in client.stream(history, adapter, adapter_source=args.adapter_source, api_token=args.api_token,
                                   system_prompt=args.system, settings=settings):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


