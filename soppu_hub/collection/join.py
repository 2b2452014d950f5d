"""`soppu-hub join`: one adapter compressed against a published collection's bases, on the joiner's machine.

Reads the collection's small files and the bases of the cluster its signature is nearest to (a second
cluster only when the first is not good enough), projects the adapter exactly through its factors, and when
the error is within the bar writes the member repo (PEFT export + cores + card), pushes it and adds it to the
members list in one commit on the collection's head. Nothing else of the collection is read or changed.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..compression.allocate import by_target
from ..compression.bundle import Bundle, ModuleBasis, compact_core, save_bundle
from ..compression.config import CompressConfig
from ..compression.export import ExportConfig, export_peft
from ..compression.plan import written_rel_errors
from ..compression.quantize import Store
from ..compression.refine import apply_choice, table_of
from ..compression.report import export_fields, lorax_fields
from ..compression.store import stored_bundle
from ..errors import CollectionError, SoppuError
from ..hub.common import TOKEN_HELP
from ..hub.pull import download_adapter, parse_source
from ..peft_format.layout import BUNDLE_DIR, REPORT_NAME
from ..peft_format.read import LoraAdapter, read_adapter
from .format import CollectionInfo, Member
from .project import cluster_order, project_module
from .remote import Collection, open_collection

# Without a target error, a joiner's bar is JOIN_SLACK x the cluster's worst member, and never below JOIN_FLOOR:
# members fitted with the bases absorb some of their own noise, which a joiner cannot (in a small cluster that
# alone can double the error), while an adapter from a task the collection has never seen sits near 1. Nor is it
# ever above the error at which compress itself calls an adapter poorly kept (the collection's
# max_adapter_error): a collection that keeps its own members badly must not wave strangers in at 0.96.
JOIN_SLACK = 1.25
JOIN_FLOOR = 0.2
TRIES = 2  # clusters whose bases are downloaded before giving up (nearest signatures first)


@dataclass
class JoinSpec:
    """One `soppu-hub join` run. Field metadata is the CLI's help."""

    source: str = field(
        metadata={"help": "the adapter to join: a PEFT LoRA folder or a Hub repo id (owner/name[@revision])"}
    )
    collection: str = field(metadata={"help": "the collection to join: owner/name on the Hub, or a collection folder"})
    collection_revision: str | None = field(
        default=None, metadata={"help": "the collection's revision (default: main)"}
    )
    max_error: float | None = field(
        default=None,
        metadata={
            "help": "join only at a mean relative error up to this (default: the collection's --target-error, else "
            f"{JOIN_SLACK}x the worst error of a member of the cluster)",
            "type": float,
        },
    )
    private_error: float | None = field(
        default=None,
        metadata={
            "help": "a module the collection's bases hold worse than this relative error keeps the fewest private "
            "directions "
            "of its own that bring it there (stored in the member repo): an adapter the bases miss joins at the cost "
            "of its own directions instead of being refused",
            "type": float,
        },
    )
    new_cluster: bool = field(
        default=False,
        metadata={
            "help": "when no cluster holds the adapter well enough, add it to the collection as a cluster of its own"
        },
    )
    out: Path | None = field(default=None, metadata={"help": "keep the member repo folder here"})
    push: bool = True
    push_to: str | None = field(default=None, metadata={"help": "the member repo id (default <user>/<name>-soppu)"})
    namespace: str | None = field(default=None, metadata={"help": "user or organisation for the member repo"})
    private: bool = field(default=False, metadata={"help": "create the member repo private"})
    revision: str | None = field(default=None, metadata={"help": "revision of a Hub source given without @revision"})
    token: str | bool | None = field(default=None, repr=False, metadata={"help": TOKEN_HELP})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out folder"})
    export: ExportConfig = field(default_factory=ExportConfig)
    command: str = "soppu-hub join"  # recorded in the card: how to reproduce the run


# The JoinSpec fields `soppu-hub join` takes as flags of the same name: every field with help but the three the CLI
# takes its own way (the positional source, --collection, --out)
OWN_WAY = ("source", "collection", "out")
FLAGS = tuple(f.name for f in fields(JoinSpec) if "help" in f.metadata and f.name not in OWN_WAY)


@dataclass
class JoinResult:
    name: str
    cluster: int
    how: str  # join or new-cluster
    mean_rel_error: float
    max_rel_error: float
    bar: float
    repo_id: str | None = None
    out: Path | None = None
    collection_revision: str | None = None  # the collection's commit that lists the member


def check_fits(adapter: LoraAdapter, coll: Collection) -> None:
    """Same base model, and every module the adapter adapts is one the collection has, at the same shape."""
    info = coll.info
    if info.base_model and adapter.base_model and info.base_model != adapter.base_model:
        raise CollectionError(
            f"{adapter.name} is for {adapter.base_model}, but collection {coll.name} is for "
            f"{info.base_model}; join a collection of the same base model"
        )
    if info.method != "full":
        raise CollectionError(
            f"collection {coll.name} is JD-{info.method}; join projects onto JD-Full collections only"
        )
    for name, mod in adapter.modules.items():
        if name not in info.modules:
            raise CollectionError(
                f"{adapter.name} adapts {name}, which collection {coll.name} has no bases for; join a "
                "collection made from adapters of the same target modules"
            )
        if list(mod.shape) != info.modules[name]:
            raise CollectionError(
                f"{adapter.name}: {name} is {tuple(mod.shape)} but {tuple(info.modules[name])} in "
                f"collection {coll.name}; the base models differ"
            )


def project_adapter(
    adapter: LoraAdapter, bases: dict[str, torch.Tensor], method: str = "full", private_error: float | None = None
) -> tuple[Bundle, dict[str, float]]:
    """The adapter as a one-member bundle on these bases, and its relative error per module (float64 scoring).
    `private_error`: a module the bases hold worse than this keeps the fewest private directions of its own that
    bring it there (compression.refine, the bases kept whole: they are the collection's)."""
    bundle = Bundle(method, [adapter.name], [adapter.config])
    errors = {}
    for name, mod in adapter.modules.items():
        U, V = bases[f"{name}.U"].float(), bases[f"{name}.V"].float()
        B, A = mod.factors()
        P, Q, errors[name] = project_module(B, A, U, V)
        bundle.modules[name] = ModuleBasis(U, V, {0: compact_core(P, Q)}, mod.kind)
        if private_error is not None and errors[name] > private_error:
            table, co = table_of(B[None], A[None], torch.tensor([mod.rank]), U, V, 0, name, [0], grid=[U.shape[1]])
            choice = by_target(table, private_error)
            bundle.modules[name] = apply_choice(bundle.modules[name], co, choice, U.dtype)
            norm = float(table.sq_norms[0])
            errors[name] = (max(choice.sq_errors[0], 0.0) / norm) ** 0.5 if norm > 0 else 0.0
    return bundle, errors


def own_cluster(adapter: LoraAdapter, rank: int) -> tuple[Bundle, dict[str, float]]:
    """--new-cluster: bases from the adapter's own SVD per module (its first `rank` directions): exact when its
    rank is at most the collection's shared rank."""
    bases = {}
    for name, mod in adapter.modules.items():
        B, A = (t.double() for t in mod.factors())
        QB, RB = torch.linalg.qr(B)
        QA, RA = torch.linalg.qr(A.mT)
        Us, _, Vsh = torch.linalg.svd(RB @ RA.mT)
        r = min(rank, Us.shape[1])
        bases[f"{name}.U"], bases[f"{name}.V"] = (QB @ Us[:, :r]).float(), (QA @ Vsh.mT[:, :r]).float()
    return project_adapter(adapter, bases)


def signature(adapter: LoraAdapter, probes: list[str]) -> torch.Tensor:
    """The adapter's signature over the collection's probe modules (zeros where it lacks one)."""
    from ..compression.cluster import SKETCH, module_signature

    parts = []
    for name in probes:
        if name in adapter.modules:
            B, A = adapter.modules[name].factors()
            parts.append(module_signature(B[None], A[None])[0])
        else:
            parts.append(torch.zeros(2 * SKETCH * SKETCH, dtype=torch.float64))
    return torch.cat(parts)


def bar_for(coll: Collection, c: int, max_error: float | None) -> float:
    if max_error is not None:
        return max_error
    if coll.info.target_error is not None:
        return coll.info.target_error
    ceiling = coll.info.settings.get("max_adapter_error", CompressConfig.max_adapter_error)
    return min(max(JOIN_SLACK * coll.info.clusters[c].max_error, JOIN_FLOOR), ceiling)


def place(
    adapter: LoraAdapter,
    coll: Collection,
    max_error: float | None,
    log: Callable[[str], None],
    private_error: float | None = None,
) -> tuple[int, Bundle, dict[str, float], float]:
    """(cluster, bundle, errors, bar) of the first of the TRIES nearest clusters whose bases keep the adapter within
    its bar; CollectionError with the best error and the two ways on when none does."""
    order = cluster_order(signature(adapter, coll.info.probes), coll.centroids())
    best = None
    for c in order[:TRIES]:
        bundle, errors = project_adapter(adapter, coll.bases(c), private_error=private_error)
        mean, bar = statistics.fmean(errors.values()), bar_for(coll, c, max_error)
        log(f"cluster {c}: mean relative error {mean:.4f} (bar {bar:.4f})")
        if mean <= bar:
            return c, bundle, errors, bar
        if best is None or mean < best[1]:
            best = (c, mean, bar)
    c, mean, bar = best
    raise CollectionError(
        f"{adapter.name}: no cluster of {coll.name} holds it well enough (best: cluster {c}, mean "
        f"relative error {mean:.3f} > {bar:.3f}); add it as a cluster of its own with --new-cluster, "
        f"or refit the collection with it (soppu-hub compress --collection {coll.name} --refit)"
    )


def member_store(info: CollectionInfo, dtype: torch.dtype) -> Store:
    """How a joining member's cores (and --new-cluster's bases) are kept: the collection's quantized store, or for a
    float collection the member's export dtype."""
    return info.stored if info.stored.quantized else Store(str(dtype).removeprefix("torch."))


def write_member(
    folder: Path,
    adapter: LoraAdapter,
    bundle: Bundle,
    ref: dict,
    basis_id: str,
    export: ExportConfig,
    entry: dict,
    coll_info: CollectionInfo,
) -> dict[str, float]:
    """The member repo folder: PEFT export, cores naming the collection's bases (kept as the collection keeps its
    store), report.json. Returns the errors of the factors as written."""
    dtype = export.torch_dtype(adapter.dtype)
    store = member_store(coll_info, dtype)
    kept = stored_bundle(bundle, store)
    info = export_peft(
        kept if store.quantized else bundle, 0, folder, export=export, dtype=dtype, extras=adapter.extras(dtype)
    )
    save_bundle(kept, folder / BUNDLE_DIR, basis_id=basis_id, bases_ref=ref, store=store)
    errors = written_rel_errors(adapter, info.factors)
    entry.update(
        mean_rel_error=statistics.fmean(errors.values()),
        max_rel_error=max(errors.values()),
        **lorax_fields(info, export),
        export_dtype=str(dtype).removeprefix("torch."),
        export=export_fields(export, [str(dtype).removeprefix("torch.")]),
        modules={n: {"rel_error": e} for n, e in errors.items()},
    )
    (folder / REPORT_NAME).write_text(json.dumps(entry, indent=2))
    return errors


def fetch_adapter(spec: JoinSpec) -> tuple[LoraAdapter, Path]:
    """The adapter to join and its folder (a Hub source is downloaded: only the files a LoRA needs)."""
    source = parse_source(spec.source, spec.revision)
    folder = source.path or download_adapter(source.repo_id, revision=source.revision, token=spec.token)
    return read_adapter(folder, name=source.name, source=source.text), folder


def check_spec(spec: JoinSpec) -> None:
    if not spec.push and spec.out is None:
        raise SoppuError("--no-push needs --out to keep the member repo somewhere")
    if spec.max_error is not None and not 0 < spec.max_error:
        raise SoppuError(f"--max-error must be a positive relative error, got {spec.max_error}")
    if spec.private_error is not None and not 0 < spec.private_error < 1:
        raise SoppuError(f"--private-error must be a relative error between 0 and 1, got {spec.private_error}")
    spec.export.validate()


def new_member(adapter: LoraAdapter, cluster: int, how: str, errors: dict[str, float], repo_id: str | None) -> Member:
    return Member(
        adapter.name,
        cluster,
        statistics.fmean(errors.values()),
        max(errors.values()),
        adapter.source,
        how,
        repo_id=repo_id,
    )


def open_for_join(spec: JoinSpec) -> Collection:
    return open_collection(spec.collection, revision=spec.collection_revision, token=spec.token)
