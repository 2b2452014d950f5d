"""A run's output folder: staged so a failure leaves nothing, then the bundle, one PEFT folder per adapter and
report.json written into it, with their byte counts."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..compression.bundle import save_bundle
from ..compression.export import ExportConfig, ExportInfo, export_peft
from ..compression.plan import Compression, Progress, written_rel_errors
from ..compression.report import Output, Report, build_report
from ..compression.store import choose_store, stored_bundle
from ..errors import SoppuError
from ..memory import trim_heap
from ..peft_format.layout import BUNDLE_DIR, COLLECTION_DIR, REPORT_NAME


@contextmanager
def staged_output(out: Path | None, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder; it becomes `out` only if the block finishes, so a failure leaves nothing.

    With out=None the folder is temporary and removed afterwards.
    """
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SoppuError(
            f"output folder {out} already exists and is not empty; choose another --out or pass --overwrite"
        )
    parent = out.parent if out is not None else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name if out else 'soppu'}.partial-", dir=parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out is None:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_outputs(
    comp: Compression,
    folder: Path,
    names: list[str],
    outputs: list[str],
    export: ExportConfig | None = None,
    *,
    collection: str | None = None,
    command: str = "",
    repo_ids: list[str | None] | None = None,
    progress: Progress | None = None,
) -> Report:
    """Bundle, one PEFT folder per adapter (with its slice of the bundle), and report.json; `progress(done, total)`
    after each adapter's folder (a thousand exports take minutes).

    The shared store is kept as --store-dtype says (store.stored_bundle: cast, or quantized with the cores refit);
    each PEFT export is written from the quantized store's values (from the fit when the store only rounds to a
    float dtype: rounding twice would add noise and gain nothing) in its own input's dtype (--export-dtype auto: a
    bf16 adapter stays bf16
    beside an fp32 one, so no repo holds more bytes per number than its original); the report's errors are those
    of the factors as written, and its byte counts those of the files.
    With `collection`, the bases go once into out/collection (collection.build) and each slice names it instead;
    `repo_ids`: where each adapter will be pushed (None: kept local), for the members list.
    """
    export = export or ExportConfig()
    store = choose_store(export.store, [a.dtype for a in comp.adapters])
    written = [stored_bundle(b, store) for b in comp.bundles]
    ids = [wb.basis_id() for wb in written]
    for c, wb in enumerate(written if collection is None else []):  # one cluster: out/bundle; several: .../cluster-<c>
        save_bundle(wb, folder / "bundle" / (f"cluster-{c}" if len(written) > 1 else ""), basis_id=ids[c], store=store)
    exports: list[ExportInfo] = []
    local = comp.local_indices()
    errors = []
    repo_params = 0
    for i, (name, adapter) in enumerate(zip(names, comp.adapters)):
        c, j = comp.cluster_of[i], local[i]
        own_dtype = export.torch_dtype(adapter.dtype)
        source = written[c] if store.quantized else comp.bundles[c]  # a float store only rounds: export the fit
        info = export_peft(source, j, folder / name, export=export, dtype=own_dtype, extras=adapter.extras(own_dtype))
        own = written[c].subset(j)
        ref = None if collection is None else {"collection": collection, "revision": None, "cluster": c}
        save_bundle(own, folder / name / BUNDLE_DIR, basis_id=ids[c], bases_ref=ref, store=store)
        kept = (
            own.num_params
            if ref is None
            else own.num_params - sum(mb.U.numel() + mb.V.numel() for mb in own.modules.values())
        )
        repo_params += kept + info.lora_params + adapter.carried_params  # lora_params: padding included
        errors.append(written_rel_errors(adapter, info.factors))
        info.factors = {}  # scored: a thousand adapters' written factors would not fit in memory together
        if i % TRIM_EVERY == TRIM_EVERY - 1:
            trim_heap()
        info.repo_bytes = tensor_bytes(folder / name)
        exports.append(info)
        if progress:
            progress(i + 1, len(names))
    outs = [Output(n, a.source, o) for n, a, o in zip(names, comp.adapters, outputs)]
    report = build_report(comp, outs, exports, errors, export, store=store)
    if collection is not None:
        from ..collection.build import write_collection_folder

        write_collection_folder(
            folder / COLLECTION_DIR,
            comp,
            written,
            ids,
            report,
            command=command,
            repo_ids=repo_ids or [None] * len(names),
            store=store,
        )
        report.collection = {"name": collection, "revision": None}
    # params_after counts the bases once; every repo also carries its cluster's bases and a PEFT export: say so
    report.written = {
        "bundle_params": sum(b.num_params for b in written),
        "repo_params": repo_params,
        "tensor_bytes": tensor_bytes(folder),
        "repo_bytes": sum(e.repo_bytes for e in exports),
    }
    (folder / REPORT_NAME).write_text(report.to_json())
    return report


TRIM_EVERY = 16  # adapters written between heap trims


def tensor_bytes(folder: Path) -> int:
    """Bytes of every safetensors file under folder: what a push uploads (the card and JSON are a few kB)."""
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def lorax_sizes(base: str | None, token: str | bool | None = None) -> tuple[int, ...] | None:
    """The --num-shard sizes LoRAX can run `base` at, from its config.json (None: no base, or no head counts)."""
    from ..hub.info import model_config
    from ..peft_format.layout import lorax_shard_sizes

    return lorax_shard_sizes(model_config(base, token=token)) if base else None
