"""The shared-basis bundle (U, V per module, cores per adapter): in memory and on disk (safetensors + JSON)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import BundleError
from ..peft_format.folder import module_scaling
from ..peft_format.layout import (
    BUNDLE_HEADER,
    BUNDLE_WEIGHTS,
)
from ..peft_format.read import LINEAR
from .quantize import Store
from .tensorfile import load_tensors, save_tensors

FORMAT = "soppu-bundle"
VERSION = 2  # 2: JD-Full cores of rank k < r / 2 stored as their factors (2 r k numbers); 1: every core dense
SHARED_VERSION = 3  # 3: cores only; the bases live in a published collection, named by the header's "bases"
PRIVATE_VERSION = 4  # 4: adapters may keep private directions (X, Y) beside the shared part; bases inside or not
QUANTIZED_VERSION = 5  # 5: tensors kept as group-wise codes (header "store"); a float store keeps versions 2-4
READS = (1, 2, 3, 4, 5)
Private = tuple[torch.Tensor, torch.Tensor]  # X (out, p), Y (p, in): an adapter's own directions, delta += X @ Y


@dataclass(frozen=True)
class FactoredCore:
    """A JD-Full core S = P @ Q kept as its exact rank-k factors: 2 r k numbers instead of r^2 (worth it for k < r / 2).

    S_i = U^T B_i A_i V has rank at most k_i, so nothing is lost; this is what makes a large shared rank cheap."""

    P: torch.Tensor  # (r, k) = U^T B_i
    Q: torch.Tensor  # (k, r) = A_i V

    def matrix(self) -> torch.Tensor:
        return self.P @ self.Q

    def numel(self) -> int:
        return self.P.numel() + self.Q.numel()

    def to(self, dtype: torch.dtype) -> FactoredCore:
        return FactoredCore(self.P.to(dtype), self.Q.to(dtype))


Core = torch.Tensor | FactoredCore  # (r, r) dense, (r,) JD-Diag, or factored


def core_size(r: int, k: int, method: str = "full") -> int:
    """Numbers stored for one core at shared rank r of an adapter of LoRA rank k: r for JD-Diag; for JD-Full
    the smaller of r^2 (dense) and 2 r k (factored)."""
    return r if method == "diag" else min(r * r, 2 * r * k)


def compact_core(P: torch.Tensor, Q: torch.Tensor) -> Core:
    """The smaller exact form of S = P @ Q (core_size): its factors when 2 r k < r^2, else the dense matrix."""
    r, k = P.shape
    return FactoredCore(P.contiguous(), Q.contiguous()) if 2 * r * k < r * r else (P @ Q).contiguous()


def _leading_core(c: Core, j: int) -> Core:
    if isinstance(c, FactoredCore):
        return compact_core(c.P[:j], c.Q[:, :j])
    return (c[:j] if c.dim() == 1 else c[:j, :j]).contiguous()


@dataclass
class ModuleBasis:
    """Shared bases of one module position and the cores of the adapters that adapt it."""

    U: torch.Tensor  # (out, r)
    V: torch.Tensor  # (in, r)
    cores: dict[int, Core]  # adapter index -> (r, r), (r,) for diag, or a FactoredCore
    kind: str = LINEAR  # or "embedding": exported as lora_embedding_A / _B
    private: dict[int, Private] = field(default_factory=dict)  # adapter index -> its own directions (private.py)

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def core_matrix(self, i: int) -> torch.Tensor:
        c = self.cores[i]
        if isinstance(c, FactoredCore):
            return c.matrix()
        return torch.diag(c) if c.dim() == 1 else c

    def private_rank(self, i: int) -> int:
        return self.private[i][0].shape[1] if i in self.private else 0

    def delta_factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter i's delta as B @ A = U S_i V^T + X_i Y_i (B: (out, r + p), A: (r + p, in))."""
        B, A = self.U @ self.core_matrix(i), self.V.T
        if i in self.private:
            X, Y = self.private[i]
            B, A = torch.cat([B, X.to(B.dtype)], dim=1), torch.cat([A, Y.to(A.dtype)], dim=0)
        return B, A.contiguous()

    @property
    def num_params(self) -> int:
        """What is stored: both bases, every core in its stored form, every private direction."""
        return (
            self.U.numel()
            + self.V.numel()
            + sum(c.numel() for c in self.cores.values())
            + sum(X.numel() + Y.numel() for X, Y in self.private.values())
        )

    def leading(self, j: int) -> ModuleBasis:
        """The first j basis directions and the matching block of every core (JD orders them by weight); private
        directions stay as they are (fitted to the residual of the full rank: still exact additions, no longer
        the best ones)."""
        if j >= self.rank:
            return self
        return ModuleBasis(
            self.U[:, :j].contiguous(),
            self.V[:, :j].contiguous(),
            {p: _leading_core(c, j) for p, c in self.cores.items()},
            self.kind,
            self.private,
        )


@dataclass
class Bundle:
    """Adapters compressed together. `adapters[i]` names adapter i; `configs[i]` is its original PEFT config."""

    method: str
    adapters: list[str]
    configs: list[dict]
    modules: dict[str, ModuleBasis] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(mb.num_params for mb in self.modules.values())

    def index(self, name: str) -> int:
        try:
            return self.adapters.index(name)
        except ValueError:
            raise BundleError(f"adapter {name!r} is not in this bundle (it holds {', '.join(self.adapters)})") from None

    def basis_id(self) -> str:
        """Content hash of the shared bases: adapters with the same id can share one resident basis."""
        h = hashlib.sha256()
        for name in sorted(self.modules):
            mb = self.modules[name]
            h.update(name.encode())
            h.update(mb.U.contiguous().float().numpy().tobytes())
            h.update(mb.V.contiguous().float().numpy().tobytes())
        return h.hexdigest()[:16]

    def truncated(self, rank: int) -> Bundle:
        """Every module cut to its leading `rank` directions: the same fit at a smaller shared rank."""
        return Bundle(self.method, self.adapters, self.configs, {n: mb.leading(rank) for n, mb in self.modules.items()})

    def factors(self, adapter: int | str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Reconstruction of one adapter as (B, A) per module, delta = B @ A = U S_i V^T."""
        i = self.index(adapter) if isinstance(adapter, str) else adapter
        return {name: mb.delta_factors(i) for name, mb in self.modules.items() if i in mb.cores}

    def subset(self, adapter: int | str) -> Bundle:
        """The shared bases plus one adapter's cores: what one pushed repo carries."""
        i = self.index(adapter) if isinstance(adapter, str) else adapter
        mods = {
            n: ModuleBasis(mb.U, mb.V, {0: mb.cores[i]}, mb.kind, {0: mb.private[i]} if i in mb.private else {})
            for n, mb in self.modules.items()
            if i in mb.cores
        }
        return Bundle(self.method, [self.adapters[i]], [self.configs[i]], mods)

    def export_rank(self, adapter: int) -> int:
        """Uniform LoRA rank that holds adapter i's reconstruction exactly in every module.

        JD-Full: rank(U S_i V^T) <= min(k_i, r), with k_i the module's original LoRA rank; private directions add
        their number p_i, but never past k_i: the original has rank k_i, and one direction over it would make LoRAX
        pad a rank-8 adapter to 16 (twice its bytes), so such a module is exported as its reconstruction's best
        rank-k_i approximation (errors are measured on what is written; the backend serves those modules from the
        export's own factors). JD-Diag: up to r, plus p_i.
        """
        return max(self.module_ranks(adapter).values(), default=1)

    def module_ranks(self, adapter: int) -> dict[str, int]:
        """Per module, the LoRA rank that holds adapter i's reconstruction exactly there (see export_rank)."""
        return {
            name: mb.rank + mb.private_rank(adapter)
            if self.method == "diag"
            else min(module_scaling(self.configs[adapter], name)[0], mb.rank + mb.private_rank(adapter))
            for name, mb in self.modules.items()
            if adapter in mb.cores
        }

    def to(self, dtype: torch.dtype) -> Bundle:
        """The same bundle with every tensor in `dtype` (what gets written)."""
        mods = {
            n: ModuleBasis(
                mb.U.to(dtype),
                mb.V.to(dtype),
                {i: c.to(dtype) for i, c in mb.cores.items()},
                mb.kind,
                {i: (X.to(dtype), Y.to(dtype)) for i, (X, Y) in mb.private.items()},
            )
            for n, mb in self.modules.items()
        }
        return Bundle(self.method, self.adapters, self.configs, mods)


def save_bundle(
    bundle: Bundle,
    folder: str | Path,
    *,
    basis_id: str | None = None,
    bases_ref: dict | None = None,
    store: Store | None = None,
) -> None:
    """`basis_id`: bundle.basis_id() when the caller has it already (a cluster's thousand subsets share one).
    `bases_ref` ({"collection", "revision", "cluster"}): the bases are kept there, not written (version 3).
    `store`: a quantized store writes every tensor as its codes (version 5); the bundle holds what
    store.stored_bundle returned, so the codes come back as written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for name, mb in bundle.modules.items():
        if bases_ref is None:
            tensors[f"{name}.U"] = mb.U.contiguous()
            tensors[f"{name}.V"] = mb.V.contiguous()
        dense = sorted(i for i, c in mb.cores.items() if not isinstance(c, FactoredCore))
        if dense:
            tensors[f"{name}.cores"] = torch.stack([mb.cores[i] for i in dense]).contiguous()
        by_rank: dict[int, list[int]] = {}
        for i in sorted(set(mb.cores) - set(dense)):
            by_rank.setdefault(mb.cores[i].P.shape[1], []).append(i)
        for k, members in by_rank.items():  # one stack per factor rank: no padding zeros are written
            tensors[f"{name}.cores_P.{k}"] = torch.stack([mb.cores[i].P for i in members]).contiguous()
            tensors[f"{name}.cores_Q.{k}"] = torch.stack([mb.cores[i].Q for i in members]).contiguous()
        modules[name] = {
            "rank": mb.rank,
            "adapters": dense,
            "factored": {str(k): m for k, m in by_rank.items()},
            "kind": mb.kind,
        }
        by_p: dict[int, list[int]] = {}
        for i in sorted(mb.private):
            by_p.setdefault(mb.private_rank(i), []).append(i)
        for p, members in by_p.items():
            tensors[f"{name}.private_X.{p}"] = torch.stack([mb.private[i][0] for i in members]).contiguous()
            tensors[f"{name}.private_Y.{p}"] = torch.stack([mb.private[i][1] for i in members]).contiguous()
        if by_p:
            modules[name]["private"] = {str(p): m for p, m in by_p.items()}
    private = any("private" in meta for meta in modules.values())
    quantized = store is not None and store.quantized
    header = {
        "format": FORMAT,
        "version": QUANTIZED_VERSION
        if quantized
        else PRIVATE_VERSION
        if private
        else VERSION
        if bases_ref is None
        else SHARED_VERSION,
        **({"store": store.header()} if quantized else {}),
        "method": bundle.method,
        "basis_id": basis_id or bundle.basis_id(),
        **({} if bases_ref is None else {"bases": bases_ref}),
        "adapters": [
            {"index": i, "name": n, "peft_config": c} for i, (n, c) in enumerate(zip(bundle.adapters, bundle.configs))
        ],
        "modules": modules,
    }
    save_tensors(folder / BUNDLE_WEIGHTS, tensors, FORMAT, store)
    (folder / BUNDLE_HEADER).write_text(json.dumps(header))  # one line: 40% fewer bytes in every repo


def bases_ref(folder: str | Path) -> dict | None:
    """Where a version-3 bundle's bases live ({"collection", "revision", "cluster"}); None when it holds its own."""
    try:
        header = json.loads((Path(folder) / BUNDLE_HEADER).read_text())
    except (OSError, ValueError):
        return None
    ref = header.get("bases") if isinstance(header, dict) else None
    return ref if isinstance(ref, dict) else None


def load_bundle(folder: str | Path, bases: dict[str, torch.Tensor] | None = None) -> Bundle:
    """`bases` ("<module>.U" / ".V" tensors): a version-3 bundle's bases, fetched from its collection by the caller."""
    folder = Path(folder)
    try:
        header = json.loads((folder / BUNDLE_HEADER).read_text())
        tensors = None if isinstance(header, dict) and "store" in header else load_file(str(folder / BUNDLE_WEIGHTS))
    except FileNotFoundError:
        missing = next(n for n in (BUNDLE_HEADER, BUNDLE_WEIGHTS) if not (folder / n).is_file())
        raise BundleError(f"{folder} is not a soppu bundle (missing {missing}); point at the bundle folder") from None
    except Exception as e:
        raise BundleError(f"{folder}: bundle cannot be read ({type(e).__name__}: {e}); download it again") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise BundleError(f"{folder}: {BUNDLE_HEADER} is not a {FORMAT} header; write the bundle again")
    if header.get("version") not in READS:
        raise BundleError(
            f"{folder}: {FORMAT} version {header.get('version')!r} is newer than this soppu-hub reads "
            f"(versions {', '.join(map(str, READS))}); upgrade soppu-hub (pip install -U soppu-hub)"
        )
    try:
        store = Store.from_header(header.get("store"))
        tensors = tensors if tensors is not None else load_tensors(folder / BUNDLE_WEIGHTS, store)
    except ValueError as e:
        raise BundleError(
            f"{folder / BUNDLE_WEIGHTS}: {e}; nothing is loaded from it, download or write it again"
        ) from None
    except FileNotFoundError:
        raise BundleError(
            f"{folder} is not a soppu bundle (missing {BUNDLE_WEIGHTS}); point at the bundle folder"
        ) from None
    except Exception as e:  # safetensors raises several types for a damaged file
        raise BundleError(f"{folder}: bundle cannot be read ({type(e).__name__}: {e}); download it again") from None
    try:
        adapters = sorted(header["adapters"], key=lambda a: a["index"])
        bundle = Bundle(header["method"], [a["name"] for a in adapters], [a["peft_config"] for a in adapters])
        modules = header["modules"].items()
    except (KeyError, TypeError, AttributeError):
        raise BundleError(f"{folder}: {BUNDLE_HEADER} is incomplete; download or write the bundle again") from None
    if "bases" in header:
        ref = header["bases"] if isinstance(header["bases"], dict) else {}
        if bases is None:
            raise BundleError(
                f"{folder}: the bases of this bundle live in collection {ref.get('collection')!r} "
                f"(cluster {ref.get('cluster')}); load it with them (soppu_hub.collection.publish.member_bases)"
            )
        tensors = {**bases, **tensors}
    for name, meta in modules:
        try:
            mb = ModuleBasis(
                tensors[f"{name}.U"],
                tensors[f"{name}.V"],
                _read_cores(tensors, name, meta),
                meta.get("kind", LINEAR),
                _read_private(tensors, name, meta),
            )
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            raise BundleError(f"{folder}: tensors for module {name} are missing; the bundle is incomplete") from None
        r = mb.rank
        if (
            mb.V.shape[1] != r
            or not all(_fits(c, r) for c in mb.cores.values())
            or not all(X.shape[0] == mb.U.shape[0] and Y.shape[1] == mb.V.shape[0] for X, Y in mb.private.values())
        ):
            raise BundleError(
                f"{folder}: module {name} has bases of rank {r} and {mb.V.shape[1]} and cores of other "
                "shapes; the bundle is corrupt, write it again"
            )
        bundle.modules[name] = mb
    return bundle


def _read_cores(tensors: dict[str, torch.Tensor], name: str, meta: dict) -> dict[int, Core]:
    """One module's cores from the file: the dense stack (v1: all of them) and one factor stack per rank (v2)."""
    cores: dict[int, Core] = {}
    if meta["adapters"]:
        dense = tensors[f"{name}.cores"]
        cores.update({i: dense[j] for j, i in enumerate(meta["adapters"])})
    for k, members in meta.get("factored", {}).items():
        P, Q = tensors[f"{name}.cores_P.{int(k)}"], tensors[f"{name}.cores_Q.{int(k)}"]
        cores.update({i: FactoredCore(P[j], Q[j]) for j, i in enumerate(members)})
    return cores


def _read_private(tensors: dict[str, torch.Tensor], name: str, meta: dict) -> dict[int, Private]:
    """One module's private directions (version 4): one X and one Y stack per number of directions."""
    out: dict[int, Private] = {}
    for p, members in meta.get("private", {}).items():
        X, Y = tensors[f"{name}.private_X.{int(p)}"], tensors[f"{name}.private_Y.{int(p)}"]
        out.update({i: (X[j], Y[j]) for j, i in enumerate(members)})
    return out


def _fits(c: Core, r: int) -> bool:
    """Whether a core read from a file fits bases of rank r."""
    if isinstance(c, FactoredCore):
        k = c.P.shape[1]
        return c.P.shape == (r, k) and c.Q.shape == (k, r)
    return c.shape in ((r, r), (r,))
