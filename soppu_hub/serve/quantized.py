"""Members' cores and private directions held as their store's group-wise codes, de-quantized per batch row.

A resident collection with a quantized store keeps, per module position, every member's part as the codes its
file holds (quantizing the values a reader got back gives the same codes: tested), one item after another with no
padding, so a thousand members cost 4.25 or 8.25 bits a number instead of 16 or 32 (plus, per item, its fp32
maximum, a 4-byte offset and a 1-byte shape index: where its scales start follows from its offset). A step gathers the
codes of its
rows only, de-quantizes them and puts each item into the zero-padded (A, B) block the batched matmuls use through
an index worked out from each row's own shape (transposed or not): one gather, whatever mix of clusters and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compression.quantize import NF4_LEVELS, Store, quantize

_QMAX = {"int8": 127, "int4": 7}


@dataclass
class QuantizedItems:
    """N matrices kept ragged (each item's codes and scales one after another, no padding between them), each placed
    top-left (transposed or not) into an (A, B) block when gathered."""

    kind: str
    group: int
    codes: torch.Tensor  # (total bytes,) uint8
    scales: torch.Tensor  # (total groups,) float16
    code_at: torch.Tensor  # (N,) int32: where each item's codes start (its scales: at code_at * per_byte / group)
    maxima: torch.Tensor  # (N,) float32
    shape: tuple[int, int]
    transpose: bool
    width: int  # the most groups any item has
    layout: torch.Tensor  # (N,) uint8: each item's row of `place` (an item's shape)
    place: torch.Tensor  # (layouts, A * B) int32: per distinct item shape, the value each target position takes
    numbers: int = 0  # the items' own numbers (what params() counts)

    def __post_init__(self) -> None:
        self._group_bytes = self.group // (1 if self.kind == "int8" else 2)  # a group's codes in bytes
        self._groups = torch.arange(self.width)
        self._bytes = torch.arange(self.width * self._group_bytes)

    @classmethod
    def build(
        cls, items: list[torch.Tensor | None], shape: tuple[int, int], store: Store, *, transpose: bool = False
    ) -> QuantizedItems:
        """`items`: each member's matrix as the store's reader got it back (None: nothing, all zeros)."""
        items = [t if t is not None else torch.zeros(0, 0) for t in items]
        qs = [quantize(t, store.kind, group=store.group) for t in items]
        codes = [q.codes[0].view(torch.uint8) for q in qs]
        scales = [q.scales[0] for q in qs]
        code_at = torch.tensor([0] + [c.numel() for c in codes[:-1]]).cumsum(0)  # items are whole groups: scales
        width = max(s.numel() for s in scales)  # start at code_at * per_byte / group
        zero = width * store.group  # one past the longest item's values: the padded zero
        layouts = {shape_: i for i, shape_ in enumerate(dict.fromkeys(tuple(t.shape) for t in items))}
        if len(layouts) > 256 or code_at[-1] >= 2**31:
            raise ValueError(f"{len(items)} items in {len(layouts)} shapes are more than one stack holds as codes")
        place = torch.stack([_place(rc, shape, transpose, zero) for rc in layouts])
        layout = torch.tensor([layouts[tuple(t.shape)] for t in items], dtype=torch.uint8)
        tail = width * store.group // (1 if store.kind == "int8" else 2)  # the last item reads `width` groups too:
        # padding, so no index needs a clamp
        return cls(
            store.kind,
            store.group,
            torch.cat([*codes, torch.zeros(tail, dtype=torch.uint8)]),
            torch.cat([*scales, torch.zeros(width, dtype=torch.float16)]),
            code_at.to(torch.int32),
            torch.stack([q.maxima[0] for q in qs]),
            shape,
            transpose,
            width,
            layout,
            place,
            sum(t.numel() for t in items),
        )

    def gather(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(b, A, B) in `dtype`: the items of `slots`, de-quantized and placed. A dozen small ops whatever the kind
        (47 us for 16 rows of 16 x 16 NF4 cores on one core here): it runs per module position at nearly every step."""
        G = self.group
        at = self.code_at.index_select(0, slots).long()[:, None]
        sidx = at // self._group_bytes + self._groups
        bidx = at + self._bytes
        b = slots.shape[0]
        values = _LEVELS[self.kind][self.codes[bidx].long()].reshape(b, -1, G)  # a byte -> its 1 or 2 levels
        scale = self.scales[sidx].float() * self.maxima.index_select(0, slots)[:, None]
        values = torch.nn.functional.pad((values * scale[..., None]).reshape(b, -1), (0, 1))  # last: a zero
        idx = self.place.index_select(0, self.layout.index_select(0, slots).int()).long()
        return values.gather(1, idx).reshape(b, *self.shape).to(dtype)

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.codes, self.scales, self.code_at, self.maxima, self.layout, self.place)
        )


def _place(rc: tuple[int, int], shape: tuple[int, int], transpose: bool, zero: int) -> torch.Tensor:
    """Target (A, B) position -> flat index into an item of shape rc (row-major, transposed or not), `zero` outside."""
    A, B = shape
    r, c = rc
    a, b = torch.arange(A)[:, None].expand(A, B), torch.arange(B)[None, :].expand(A, B)
    src_r, src_c = (b, a) if transpose else (a, b)
    return (
        torch.where((src_r < r) & (src_c < c), src_r * c + src_c, torch.full_like(a, zero)).reshape(-1).to(torch.int32)
    )


def _byte_levels(kind: str) -> torch.Tensor:
    """(256, 1 or 2): the de-quantized levels (before scaling) a stored byte holds, low nibble first."""
    byte = torch.arange(256)
    if kind == "int8":
        return (byte.to(torch.uint8).view(torch.int8).float() / _QMAX["int8"])[:, None]
    nib = torch.stack([byte & 0xF, byte >> 4], dim=-1)
    return NF4_LEVELS[nib] if kind == "nf4" else (nib - 8).float() / _QMAX["int4"]


_LEVELS = {kind: _byte_levels(kind) for kind in ("int8", "int4", "nf4")}
