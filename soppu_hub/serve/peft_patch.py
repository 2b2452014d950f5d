"""PEFT's LoRA Linear layers patched to run a mixed batch in one forward (the math is in lora_ops.py).

`install` replaces PEFT's mixed-batch forward (a Python loop over the batch's adapters, one sub-batch each) on
every LoRA Linear with gathered matmuls; `rows_use` names each row's adapter for the layers without PEFT's
per-call hooks. Rows of a resident collection's members run on its stacked bases and cores (resident.py).
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch
import torch.nn.functional as F

from .lora_ops import gathered_lora, shared_basis_lora, shared_factored_lora, stack_slots


def install(peft_model) -> int:
    """Give every PEFT LoRA Linear of the model the gathered mixed-batch forward; returns how many were new.
    Idempotent: call it after each adapter load (PEFT adds layers for modules no earlier adapter targeted)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.utils import ModulesToSaveWrapper

    # rows_use covers LoRA linears only: embedding LoRA or modules_to_save need PEFT's adapter_names hooks
    peft_model._soppu_rows_ok = not any(
        isinstance(m, ModulesToSaveWrapper) or (isinstance(m, LoraLayer) and not isinstance(m, LoraLinear))
        for m in peft_model.modules())
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


def _plan(layer, key: tuple, device) -> list:
    """[(rows, x_rows -> delta)] for one batch composition `key` (names, generation): one entry per group of rows
    computed together."""
    from .shared_bases import CoreLinear

    adapter_names = key[0]
    plain: dict[str, list[int]] = {}
    shared: dict[tuple[int, int], dict[str, list[int]]] = {}
    resident, stack = layer.__dict__.get("_soppu_resident") or (None, None)
    rr = resident.rows_for(key, adapter_names, device) if resident is not None else None
    if rr is not None and rr.rows is None:  # every row a resident member (worked out once for all layers)
        return [(None, stack.applier(rr))]
    for i, name in enumerate(adapter_names):
        if rr is not None and name in resident.slots:
            continue
        if name not in layer.lora_A:
            continue
        a = layer.lora_A[name]
        if isinstance(a, CoreLinear):
            shared.setdefault((id(a.weight), id(layer.lora_B[name].weight)), {}).setdefault(name, []).append(i)
        else:
            plain.setdefault(name, []).append(i)
    steps = []
    if len(plain) == 1:  # one adapter: one sub-batch, as PEFT does it
        (name, idx), = plain.items()
        a, b, scale = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
        steps.append((torch.tensor(idx, device=device), lambda xr: F.linear(F.linear(xr.to(a.dtype), a), b) * scale))
    elif plain:
        A, B = stack_slots([(layer.lora_B[n].weight * layer.scaling[n], layer.lora_A[n].weight) for n in plain])
        rows, slots = _rows_and_slots(plain, device)
        steps.append((rows, lambda xr, A=A, B=B, slots=slots: gathered_lora(xr.to(A.dtype), A, B, slots)))
    for group in shared.values():
        names = list(group)
        vt, u = layer.lora_A[names[0]].weight, layer.lora_B[names[0]].weight  # the bundle's V^T and U, held once
        rows, slots = _rows_and_slots(group, device)
        cores = [layer.lora_A[n] for n in names]
        if all(c.factored for c in cores):  # S_i = P_i Q_i: two thin matmuls per row
            Q, P = stack_slots([(c.core_p * layer.scaling[n], c.core_q) for c, n in zip(cores, names)])
            steps.append((rows, lambda xr, u=u, v=vt.T, Q=Q, P=P, slots=slots:
                          shared_factored_lora(xr.to(u.dtype), u, v, Q, P, slots)))
            continue
        dense = torch.stack([c.dense_core() * layer.scaling[n] for c, n in zip(cores, names)])
        steps.append((rows, lambda xr, u=u, v=vt.T, cores=dense, slots=slots:
                      shared_basis_lora(xr.to(u.dtype), u, v, cores, slots)))
    if rr is not None:  # every resident row, whatever its cluster, in a few batched matmuls
        steps.append((rr.rows, stack.applier(rr)))
    n = len(adapter_names)
    return [(None if len(rows) == n else rows, apply) for rows, apply in steps]  # rows are in batch order


def _rows_and_slots(by_name: dict[str, list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows in batch order and each one's slot (its adapter's index in by_name)."""
    pairs = sorted((i, k) for k, idx in enumerate(by_name.values()) for i in idx)
    return torch.tensor([i for i, _ in pairs], device=device), torch.tensor([k for _, k in pairs], device=device)
