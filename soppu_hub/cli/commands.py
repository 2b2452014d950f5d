"""What each subcommand does: call the library, print the result. The library is imported where a command needs it."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import SoppuError
from ..peft_format.layout import BASE_MODEL_ID
from ..progress import ProgressBar, hub_bars_off, log_above_bars
from .flags import command_line, job_spec


def cmd_compress(args: argparse.Namespace) -> int:
    from ..compression.report import format_table
    from ..pipeline.job import run_job

    spec = job_spec(args)
    if args.author:
        from ..hub.pull import list_adapter_repos

        spec.sources += list_adapter_repos(
            args.author, base_model=args.base_model, token=args.token, workers=args.workers
        )
    members = None
    if spec.refit:
        from ..pipeline.refit import refit_spec

        spec, members = refit_spec(spec)
    if not spec.sources:
        raise SoppuError("no adapters given: name folders or repo ids, or pass --sources-file FILE or --author USER")
    bars = {
        phase: ProgressBar(phase, unit)
        for phase, unit in (
            ("downloading", "repo"),
            ("compressing", "module"),
            ("exporting", "adapter"),
            ("verifying", "adapter"),
            ("scoring", "adapter"),
            ("cards", "card"),
            ("pushing", "repo"),
        )
    }
    log = (lambda msg: None) if args.quiet else log_above_bars
    shown = {k: None if args.quiet else b for k, b in bars.items()}
    try:  # huggingface_hub's own per-file bars (snapshot downloads, uploads) off: one bar per phase says it
        with hub_bars_off():
            result = run_job(
                spec,
                progress=shown["compressing"],
                log=log,
                cards_progress=shown["cards"],
                download_progress=shown["downloading"],
                push_progress=shown["pushing"],
                verify_progress=shown["verifying"],
                export_progress=shown["exporting"],
                score_progress=shown["scoring"],
            )
    finally:
        for b in bars.values():
            b.close()
    if not args.quiet:
        print(format_table(result.report))
        if result.out:
            print(f"results: {result.out} (cards: {result.out}/<name>/README.md)")
        for repo_id, pushed in result.pushed.items():
            print(f"unchanged {repo_id} (already on the Hub)" if pushed.skipped else f"pushed {repo_id}: {pushed.url}")
    if members is not None and not args.quiet:
        from ..pipeline.refit import drift, format_drift

        print(format_drift(drift(members, result.report)))
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    from ..collection.join import FLAGS as names
    from ..collection.join import JoinSpec
    from ..compression.export import ExportConfig
    from ..pipeline.join import run_join

    spec = JoinSpec(
        args.source,
        args.collection,
        out=Path(args.out) if args.out else None,
        push=not args.no_push,
        export=ExportConfig(pad=args.pad, uniform=args.uniform, lorax_tp=args.lorax_tp, dtype=args.dtype),
        command=command_line(args.argv),
        **{n: getattr(args, n) for n in names},
    )
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    r = run_join(spec, log=log)
    if not args.quiet:
        where = r.repo_id or r.out
        print(
            f"{r.name}: joined {args.collection} as "
            f"{'a new cluster ' + str(r.cluster) if r.how == 'new-cluster' else f'cluster {r.cluster}'}, "
            f"mean relative error {r.mean_rel_error:.4f} (worst module {r.max_rel_error:.4f}); member repo: {where}"
        )
    return 0


def cmd_hub(args: argparse.Namespace) -> int:
    from ..hubserver import load_auth, serve

    auth = load_auth(args.user, args.org, args.users_file)
    print(
        f"offline Hub on http://{args.host}:{args.port} (data in {args.root}); use HF_ENDPOINT=http://{args.host}:{args.port}",
        flush=True,
    )
    serve(args.root, auth, host=args.host, port=args.port, max_commit_bytes=int(args.max_commit_mb * 2**20))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from ..serve import build_engine, serve
    from ..serve.config import ServeConfig

    config = ServeConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig) if hasattr(args, f.name)}
    )
    config.admin_token = config.admin_token or os.environ.get("SOPPU_ADMIN_TOKEN") or None
    engine = build_engine(config)
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
    print(
        f"chatting with {adapter or 'the base model'} on {client.model_id} at {args.url}; Ctrl-D or /exit ends",
        file=sys.stderr,
    )
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
        for piece in client.stream(
            history,
            adapter,
            adapter_source=args.adapter_source,
            api_token=args.api_token,
            system_prompt=args.system,
            settings=settings,
        ):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})
