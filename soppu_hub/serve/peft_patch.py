"""PEFT's LoRA Linear layers patched to run a mixed batch in one forward (the math is in lora_ops.py).

`install` replaces PEFT's mixed-batch forward (a Python loop over the batch's adapters, one sub-batch each) on
every LoRA Linear with gathered matmuls; `rows_use` names each row's adapter for the layers without PEFT's
per-call hooks. Rows of a resident collection's members run on its stacked bases and cores (resident.py).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .lora_ops import shared_basis_lora, shared_factored_lora, stack_slots


def install(peft_model) -> int:
    """Give every PEFT LoRA Linear of the model the gathered mixed-batch forward; returns how many were new.
    Idempotent: call it after each adapter load (PEFT adds layers for modules no earlier adapter targeted)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.utils import ModulesToSaveWrapper

    # rows_use covers LoRA linears only: embedding LoRA or modules_to_save need PEFT's adapter_names hooks
    peft_model._soppu_rows_ok = not any(
        isinstance(m, ModulesToSaveWrapper) or (isinstance(m, LoraLayer) and not isinstance(m, LoraLinear))
        for m in peft_model.modules()
    )
    new = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLinear) and not getattr(module, "_soppu_gathered", False):
            module._mixed_batch_forward = types.MethodType(_gathered_mixed_batch_forward, module)
            module.forward = types.MethodType(_forward_rows, module)
            module._soppu_gathered = True
            new += 1
    adapters_changed()
    return new


_ROWS: ContextVar[tuple[str, ...] | None] = ContextVar("soppu_rows", default=None)
_GENERATION = [0]  # bumped whenever an adapter is loaded, unloaded or made resident


def adapters_changed() -> None:
    """Plans are kept per batch composition and this generation: after a load, an unload or a new resident
    collection, a name may stand for other tensors (or a layer may gain or lose it), so every plan is made anew."""
    _GENERATION[0] += 1


@contextmanager
def rows_use(adapter_names: list[str] | None) -> Iterator[None]:
    """While inside, installed LoRA layers give row i adapter_names[i] (None: PEFT's usual behaviour). PEFT's own
    `adapter_names=` argument does the same by adding a hook to every LoRA layer on each call, which costs more
    than a decoding step of a small model."""
    token = _ROWS.set(None if adapter_names is None else tuple(adapter_names))
    try:
        yield
    finally:
        _ROWS.reset(token)


def _forward_rows(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    from peft.tuners.lora.layer import Linear as LoraLinear

    names = kwargs.pop("adapter_names", None) or _ROWS.get()
    if names is None or self.disable_adapters or self.merged:
        return LoraLinear.forward(self, x, *args, **kwargs)
    return self._mixed_batch_forward(x, *args, adapter_names=names, **kwargs)


def _gathered_mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
    """PEFT's `_mixed_batch_forward` contract (row i uses adapter_names[i]; "__base__" none) in a few batched
    matmuls: plain LoRAs gathered per row, adapters sharing a JD basis grouped on it. The gathered tensors are
    built once per batch composition and adapter generation (every decoding step of a batch reuses them) and kept
    for the last one only."""
    from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
    from peft.tuners.lora.layer import Linear as LoraLinear

    if any(n in self.lora_variant for n in set(adapter_names)):  # DoRA and friends: PEFT's own loop
        return LoraLinear._mixed_batch_forward(self, x, *args, adapter_names=adapter_names, **kwargs)
    for k in VARIANT_KWARG_KEYS:
        kwargs.pop(k, None)
    result = self.base_layer(x, *args, **kwargs)
    key = (adapter_names if isinstance(adapter_names, tuple) else tuple(adapter_names), _GENERATION[0])
    cached = self.__dict__.get("_soppu_plan")
    if cached is None or cached[0] != key:  # (kept in __dict__: nn.Module's __setattr__ costs more than the check)
        cached = self.__dict__["_soppu_plan"] = (key, _plan(self, key, x.device))
    for rows, apply in cached[1]:
        if rows is None:  # the group is the whole batch, in order: no gather, no scatter
            result += apply(x.reshape(x.shape[0], -1, x.shape[-1])).reshape(*x.shape[:-1], -1).to(result.dtype)
            continue
        xr = x[rows]
        result[rows] += apply(xr.reshape(len(rows), -1, xr.shape[-1])).reshape(*xr.shape[:-1], -1).to(result.dtype)
    return result


class _Entry(NamedTuple):
    module: torch.nn.Module  # PEFT's lora_A module (a CoreLinear for an adapter on a shared basis)
    A: torch.Tensor  # (r, d); a bundle's V^T for a CoreLinear
    B: torch.Tensor  # (m, r); a bundle's U
    scale: float
    basis: tuple[int, int] | None  # the shared basis it sits on (ids of V^T and U), None for a plain LoRA


def _table(layer) -> dict[str, _Entry]:
    """The layer's adapters, read off its PEFT modules once per adapter generation: a new batch composition then
    costs dict lookups, not nn.Module attribute walks (which cost more than the matmuls of a small model)."""
    from .shared_bases import CoreLinear

    cached = layer.__dict__.get("_soppu_table")
    if cached is None or cached[0] != _GENERATION[0]:
        entries = {}
        for name, a in layer.lora_A.items():
            b = layer.lora_B[name].weight
            basis = (id(a.weight), id(b)) if isinstance(a, CoreLinear) else None
            entries[name] = _Entry(a, a.weight, b, layer.scaling[name], basis)
        cached = layer.__dict__["_soppu_table"] = (_GENERATION[0], entries)
    return cached[1]


def _plan(layer, key: tuple, device) -> list:
    """[(rows, x_rows -> delta)] for one batch composition `key` (names, generation): one entry per group of rows
    computed together."""
    adapter_names = key[0]
    resident, stack = layer.__dict__.get("_soppu_resident") or (None, None)
    rr = resident.rows_for(key, adapter_names, device) if resident is not None else None
    if rr is not None and rr.rows is None:  # every row a resident member (worked out once for all layers)
        return [(None, stack.applier(rr))]
    table = _table(layer)  # resident members and "__base__" are not in it
    plain: dict[str, list[int]] = {}
    shared: dict[tuple[int, int], dict[str, list[int]]] = {}
    for i, name in enumerate(adapter_names):
        e = table.get(name)
        if e is not None:
            (plain if e.basis is None else shared.setdefault(e.basis, {})).setdefault(name, []).append(i)
    steps = []
    if len(plain) == 1:  # one adapter: one sub-batch, as PEFT does it
        ((name, idx),) = plain.items()
        a, b, scale = table[name].A, table[name].B, table[name].scale
        steps.append((torch.tensor(idx, device=device), lambda xr: F.linear(F.linear(xr.to(a.dtype), a), b) * scale))
    elif plain:  # each row's own factors stacked once per composition (zero-padded to the largest rank when they
        # differ), its scaling applied after: no per-adapter copies of B scaled, no gather at every step
        rows, slots = _rows_and_slots(plain, device)
        entries = [table[n] for n in plain]
        r = max(e.A.shape[0] for e in entries)
        per_row = [entries[k] for k in slots.tolist()]
        A = torch.stack([_padded(e.A, r, 0) for e in per_row]).transpose(1, 2)
        B = torch.stack([_padded(e.B, r, 1) for e in per_row]).transpose(1, 2)
        scale = torch.tensor([e.scale for e in per_row], dtype=A.dtype, device=device).view(-1, 1, 1)
        steps.append((rows, lambda xr, A=A, B=B, scale=scale: torch.bmm(torch.bmm(xr.to(A.dtype), A), B) * scale))
    for group in shared.values():
        names = list(group)
        vt, u = table[names[0]].A, table[names[0]].B  # the bundle's V^T and U, held once
        rows, slots = _rows_and_slots(group, device)
        cores = [(table[n].module, table[n].scale) for n in names]
        if all(c.factored for c, _ in cores):  # S_i = P_i Q_i: two thin matmuls per row
            Q, P = stack_slots([(c.core_p * scale, c.core_q) for c, scale in cores])
            steps.append(
                (
                    rows,
                    lambda xr, u=u, v=vt.T, Q=Q, P=P, slots=slots: shared_factored_lora(
                        xr.to(u.dtype), u, v, Q, P, slots
                    ),
                )
            )
            continue
        dense = torch.stack([c.dense_core() * scale for c, scale in cores])
        steps.append(
            (
                rows,
                lambda xr, u=u, v=vt.T, cores=dense, slots=slots: shared_basis_lora(xr.to(u.dtype), u, v, cores, slots),
            )
        )
    if rr is not None:  # every resident row, whatever its cluster, in a few batched matmuls
        steps.append((rr.rows, stack.applier(rr)))
    n = len(adapter_names)
    return [(None if len(rows) == n else rows, apply) for rows, apply in steps]  # rows are in batch order


def _padded(w: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """w zero-padded to rank r along dim (0: an A factor, 1: a B factor); w itself when it has rank r."""
    return w if w.shape[dim] == r else F.pad(w, (0, r - w.shape[1]) if dim else (0, 0, 0, r - w.shape[0]))


def _rows_and_slots(by_name: dict[str, list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows in batch order and each one's slot (its adapter's index in by_name)."""
    pairs = sorted((i, k) for k, idx in enumerate(by_name.values()) for i in idx)
    return torch.tensor([i for i, _ in pairs], device=device), torch.tensor([k for _, k in pairs], device=device)
