"""The stored form of a bundle (--store-dtype): a float dtype, or group-wise codes with the cores refit to them.

Pure torch. `stored_bundle` returns the values a reader gets back, so exports are written from, and errors
measured on, exactly what is stored. With a quantized store the bases are quantized first, then each core is
refit by least squares to the quantized bases (U^+ U S V^T V^+T: the part of the error that lies in their span
comes back), then quantized itself; private directions are quantized as they are.
"""

from __future__ import annotations

import torch

from .bundle import Bundle, FactoredCore, ModuleBasis
from .quantize import Store, roundtrip


def choose_store(kind: str, inputs: list[torch.dtype]) -> Store:
    """--store-dtype made concrete: auto keeps the inputs' dtype when they agree (float64 as float32) and takes
    bfloat16 for a mixed set, so the store never holds more bytes per number than most inputs did."""
    if kind != "auto":
        return Store(kind)
    kinds = set(inputs)
    if len(kinds) == 1:
        only = kinds.pop()
        return Store("float32" if only == torch.float64 else str(only).removeprefix("torch."))
    return Store("bfloat16")


def stored_bundle(bundle: Bundle, store: Store) -> Bundle:
    """The bundle as a reader of `store` gets it back (float32 values for a quantized store)."""
    if not store.quantized:
        return bundle.to(store.dtype)
    return Bundle(
        bundle.method,
        bundle.adapters,
        bundle.configs,
        {n: _stored_module(mb, store) for n, mb in bundle.modules.items()},
    )


def stored_bases(U: torch.Tensor, V: torch.Tensor, store: Store) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's bases as stored."""
    if not store.quantized:
        return U.to(store.dtype), V.to(store.dtype)
    return _rt(U, store), _rt(V, store)


def stored_core(core: torch.Tensor | FactoredCore, store: Store) -> torch.Tensor | FactoredCore:
    """One core as stored (already fitted to the stored bases)."""
    if isinstance(core, FactoredCore):
        return FactoredCore(_rt(core.P, store), _rt(core.Q, store)) if store.quantized else core.to(store.dtype)
    return _rt(core, store) if store.quantized else core.to(store.dtype)


def _rt(t: torch.Tensor, store: Store) -> torch.Tensor:
    return roundtrip(t, store.kind, group=store.group)


def _stored_module(mb: ModuleBasis, store: Store) -> ModuleBasis:
    U, V = mb.U.double(), mb.V.double()
    Uq, Vq = stored_bases(mb.U, mb.V, store)
    left = torch.linalg.lstsq(Uq.double(), U).solution  # (r, r): Uq @ left ~ U
    right = torch.linalg.lstsq(Vq.double(), V).solution
    cores = {}
    for i, c in mb.cores.items():
        if isinstance(c, FactoredCore):
            refit = FactoredCore((left @ c.P.double()).float(), (c.Q.double() @ right.T).float())
        elif c.dim() == 1:  # JD-Diag keeps a diagonal core: only the diagonal of the refit is stored
            refit = torch.diagonal(left @ torch.diag(c.double()) @ right.T).float()
        else:
            refit = (left @ c.double() @ right.T).float()
        cores[i] = stored_core(refit, store)
    private = {i: (_rt(X, store), _rt(Y, store)) for i, (X, Y) in mb.private.items()}
    return ModuleBasis(Uq, Vq, cores, mb.kind, private)
