"""How the shared-basis store is kept (`Store`: a float dtype, or group-wise int8 / int4 / NF4 codes with fp16
scales) and the codes themselves, in pure torch.

Every `items`-th slice of a tensor (one core of a stack, or the whole of a basis) is flattened and cut into groups
of `group` numbers; each group keeps its absolute maximum as an fp16 fraction of its slice's fp32 maximum (so no
scale under- or overflows fp16) and each number a code: int8 symmetric (-127..127), int4 symmetric (-7..7, two
codes per byte) or NF4 (QLoRA's 16 normal-quantile levels, two per byte). A slice is quantized alone, so a member
repo holding one core writes the same codes as the collection's stack; quantizing what `dequantize` returned gives
the same codes back (tested), so a store can be written from its de-quantized values.

Hand-written rather than taken from torchao 0.18 (its `quant_primitives` do the affine maths, but importing it
takes 2 s and prints load failures of its CUDA extensions on a CPU machine, and none of torchao, optimum-quanto,
bitsandbytes or hqq writes plain safetensors tensors that an older reader can refuse by a version number).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

QUANTIZED = ("int8", "int4", "nf4")
GROUP = 64  # numbers per scale: fp16 scales add 0.25 bits per number
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
_QMAX = {"int8": 127, "int4": 7}
_BITS = {"int8": 8, "int4": 4, "nf4": 4}


FLOATS = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
STORE_DTYPES = ("auto", *FLOATS, *QUANTIZED)


@dataclass(frozen=True)
class Store:
    """How the shared-basis store is kept: `kind` a float dtype name (cast) or one of QUANTIZED (group-wise codes)."""

    kind: str = "float32"
    group: int = GROUP

    @property
    def quantized(self) -> bool:
        return self.kind in QUANTIZED

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the values a reader gets back."""
        return torch.float32 if self.quantized else FLOATS[self.kind]

    @property
    def bytes_per_number(self) -> float:
        return bits_per_number(self.kind, self.group) / 8 if self.quantized else self.dtype.itemsize

    @property
    def name(self) -> str:
        return self.kind if self.quantized else str(self.dtype).removeprefix("torch.")

    def header(self) -> dict | None:
        """What a file's header records (None for a float store: older readers read it unchanged)."""
        return {"dtype": self.kind, "group": self.group} if self.quantized else None

    @classmethod
    def from_header(cls, meta: object) -> Store | None:
        """A file header's record back (None: there is none, a float store); one this version cannot read raises
        ValueError."""
        if meta is None:
            return None
        if (
            not isinstance(meta, dict)
            or meta.get("dtype") not in QUANTIZED
            or not isinstance(meta.get("group"), int)
            or not 2 <= meta["group"] <= 4096
            or meta["group"] % 2
        ):
            raise ValueError(f"store {meta!r} is not one this soppu-hub reads ({', '.join(QUANTIZED)} in even groups)")
        return cls(meta["dtype"], meta["group"])


def bits_per_number(kind: str, group: int = GROUP) -> float:
    """Stored bits per number: the code and its share of the fp16 group scale (slice maxima and shapes aside)."""
    return _BITS[kind] + 16 / group


@dataclass(frozen=True)
class Quantized:
    """One tensor's codes: `codes` uint8 / int8 (items, padded numel [/ 2 when packed]), `scales` fp16 (items, groups)
    as fractions of `maxima` fp32 (items,), `shape` the original tensor's."""

    codes: torch.Tensor
    scales: torch.Tensor
    maxima: torch.Tensor
    shape: tuple[int, ...]


def _slices(t: torch.Tensor, items: int, group: int) -> torch.Tensor:
    """(items, groups, group) float32, each slice flattened and zero-padded to whole groups."""
    flat = t.float().reshape(items, -1)
    pad = -flat.shape[1] % group
    return torch.nn.functional.pad(flat, (0, pad)).reshape(items, -1, group)


def quantize(t: torch.Tensor, kind: str, *, items: int = 1, group: int = GROUP) -> Quantized:
    """`t` with its first dimension split into `items` slices quantized alone (items=1: the whole tensor)."""
    if kind not in QUANTIZED:
        raise ValueError(f"unknown quantized kind {kind!r} (one of {', '.join(QUANTIZED)})")
    x = _slices(t, items, group)
    absmax = x.abs().amax(dim=2)  # (items, groups)
    maxima = (absmax.amax(dim=1) if absmax.shape[1] else torch.ones(items)).clamp_min(torch.finfo(torch.float32).tiny)
    scales = (absmax / maxima[:, None]).to(torch.float16)
    scale = scales.float() * maxima[:, None]  # what dequantize will multiply by
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
    if kind == "nf4":
        codes = (x / safe).unsqueeze(-1).sub(NF4_LEVELS).abs().argmin(-1).to(torch.uint8)
    else:
        q = _QMAX[kind]
        codes = (x / safe * q).round().clamp(-q, q)
        codes = codes.to(torch.int8) if kind == "int8" else (codes + 8).to(torch.uint8)
    codes = codes.reshape(items, -1)
    if kind != "int8":
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return Quantized(codes.contiguous(), scales.contiguous(), maxima.contiguous(), tuple(t.shape))


def dequantize(qt: Quantized, kind: str, *, group: int = GROUP) -> torch.Tensor:
    """float32 values of the original shape."""
    items = qt.codes.shape[0]
    if kind == "int8":
        values = qt.codes.float() / _QMAX[kind]
    else:
        nib = torch.stack([qt.codes & 0xF, qt.codes >> 4], dim=-1).reshape(items, -1).long()
        values = NF4_LEVELS[nib] if kind == "nf4" else (nib - 8).float() / _QMAX[kind]
    scale = qt.scales.float() * qt.maxima.float()[:, None]
    values = (values.reshape(items, -1, group) * scale[..., None]).reshape(items, -1)
    numel = 1
    for d in qt.shape:
        numel *= d
    return values[:, : numel // items].reshape(qt.shape)


def roundtrip(t: torch.Tensor, kind: str, *, items: int = 1, group: int = GROUP) -> torch.Tensor:
    """What a reader gets back for `t` (float32): the values a store is refitted against and exported from."""
    return dequantize(quantize(t, kind, items=items, group=group), kind, group=group)


BLOBS = ("q.codes", "q.scales", "q.maxima")  # every tensor of a file in three entries: a few bytes of header each


def pack(
    tensors: dict[str, torch.Tensor], kind: str, *, group: int = GROUP, whole: tuple[str, ...] = ()
) -> tuple[dict[str, torch.Tensor], str]:
    """A file's tensors as codes: each stacked tensor (first dimension one item per adapter) item by item, names
    ending in one of `whole` (bases) as one slice. Returns the three blobs (codes as bytes, fp16 scales, fp32 slice
    maxima, every tensor's one after another) and the index (JSON: store, then [name, shape, items] per tensor),
    which the caller keeps as the file's metadata: one entry per tensor would cost more header than a core's codes."""
    codes, scales, maxima, index = [], [], [], []
    for name, t in tensors.items():
        items = 1 if name.endswith(whole) else t.shape[0]
        q = quantize(t, kind, items=items, group=group)
        codes.append(q.codes.reshape(-1).view(torch.uint8))
        scales.append(q.scales.reshape(-1))
        maxima.append(q.maxima)
        index.append([name, list(t.shape), items])
    blobs = [
        torch.cat(x) if x else torch.zeros(0, dtype=d)
        for x, d in ((codes, torch.uint8), (scales, torch.float16), (maxima, torch.float32))
    ]
    return dict(zip(BLOBS, blobs)), json.dumps({"dtype": kind, "group": group, "tensors": index})


def unpack(blobs: dict[str, torch.Tensor], index: str) -> dict[str, torch.Tensor]:
    """pack's tensors back, de-quantized (float32). Damage (a blob of the wrong dtype or size, NaN / Inf / negative
    scales, an out-of-range code, an unreadable index) raises ValueError naming the tensor."""
    try:
        meta = json.loads(index)
        kind, group, entries = meta["dtype"], int(meta["group"]), meta["tensors"]
        assert kind in QUANTIZED and 2 <= group <= 4096 and group % 2 == 0
        entries = [(str(n), tuple(int(d) for d in shape), int(items)) for n, shape, items in entries]
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ValueError("its quantization index is damaged") from None
    try:
        codes, scales, maxima = (blobs[b] for b in BLOBS)
    except KeyError as e:
        raise ValueError(f"entry {e.args[0]} is missing") from None
    if codes.dtype != torch.uint8 or scales.dtype != torch.float16 or maxima.dtype != torch.float32:
        raise ValueError("its quantized entries have the wrong dtypes")
    out, at = {}, [0, 0, 0]
    per_byte = 1 if kind == "int8" else 2
    for name, shape, items in entries:
        numel = 1
        for d in shape:
            numel *= d
        if items < 1 or numel % items or (items > 1 and shape[0] != items):
            raise ValueError(f"tensor {name}: its index entry is damaged")
        groups = -(-numel // items // group)
        sizes = (items * groups * group // per_byte, items * groups, items)
        parts = [blob[a : a + n] for blob, a, n in zip((codes, scales, maxima), at, sizes)]
        if any(p.numel() != n for p, n in zip(parts, sizes)):
            raise ValueError(f"tensor {name}: its codes or scales are cut short (wrong shape)")
        at = [a + n for a, n in zip(at, sizes)]
        c, sc, mx = parts
        if not (torch.isfinite(sc).all() and torch.isfinite(mx).all() and (sc >= 0).all() and (mx > 0).all()):
            raise ValueError(f"tensor {name}: its scales hold NaN, Inf or negative values")
        c = c.view(torch.int8) if kind == "int8" else c
        if kind == "int8" and (c == -128).any():
            raise ValueError(f"tensor {name}: its int8 codes are out of range (-128)")
        out[name] = dequantize(Quantized(c.reshape(items, -1), sc.reshape(items, -1), mx, shape), kind, group=group)
    if at != [codes.numel(), scales.numel(), maxima.numel()]:
        raise ValueError("its quantized entries hold more than its index names (wrong shape)")
    return out
