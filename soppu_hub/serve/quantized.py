"""Members' cores and private directions held as their store's group-wise codes, de-quantized per batch row.

A resident collection with a quantized store keeps, per module position, every member's part as the codes its
file holds (quantizing the values a reader got back gives the same codes: tested), one item after another with no
padding, so a thousand members cost 4.25 or 8.25 bits a number instead of 16 or 32. A step gathers the codes of its
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
    code_at: torch.Tensor  # (N,) long: where each item's codes start
    scale_at: torch.Tensor  # (N,) long: where its scales start
    maxima: torch.Tensor  # (N,) float32
    dims: torch.Tensor  # (N, 2) int32: each item's own (rows, columns)
    shape: tuple[int, int]
    transpose: bool
    width: int  # the most groups any item has
    numbers: int = 0  # the items' own numbers (what params() counts)

    @classmethod
    def build(cls, items: list[torch.Tensor | None], shape: tuple[int, int], store: Store, *,
              transpose: bool = False) -> "QuantizedItems":
        """`items`: each member's matrix as the store's reader got it back (None: nothing, all zeros)."""
        items = [t if t is not None else torch.zeros(0, 0) for t in items]
        qs = [quantize(t, store.kind, group=store.group) for t in items]
        codes = [q.codes[0].view(torch.uint8) for q in qs]
        scales = [q.scales[0] for q in qs]
        starts = lambda parts: torch.tensor([0] + [p.numel() for p in parts[:-1]]).cumsum(0)  # noqa: E731
        return cls(store.kind, store.group, torch.cat(codes), torch.cat(scales), starts(codes), starts(scales),
                   torch.stack([q.maxima[0] for q in qs]), torch.tensor([list(t.shape) for t in items], dtype=torch.int32),
                   shape, transpose, max(s.numel() for s in scales), sum(t.numel() for t in items))

    def gather(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(b, A, B) in `dtype`: the items of `slots`, de-quantized and placed."""
        G, per_byte = self.group, 1 if self.kind == "int8" else 2
        groups = torch.arange(self.width)
        sidx = (self.scale_at.index_select(0, slots)[:, None] + groups).clamp(max=max(self.scales.numel() - 1, 0))
        bidx = (self.code_at.index_select(0, slots)[:, None] + torch.arange(self.width * G // per_byte)).clamp(
            max=max(self.codes.numel() - 1, 0))
        c = self.codes[bidx] if self.codes.numel() else torch.zeros(bidx.shape, dtype=torch.uint8)
        b = c.shape[0]
        if self.kind == "int8":
            values = c.view(torch.int8).float() / _QMAX["int8"]
        else:
            nib = torch.stack([c & 0xF, c >> 4], dim=-1).reshape(b, -1).long()
            values = NF4_LEVELS[nib] if self.kind == "nf4" else (nib - 8).float() / _QMAX["int4"]
        scale = (self.scales[sidx].float() if self.scales.numel() else torch.zeros(sidx.shape)) * \
            self.maxima.index_select(0, slots)[:, None]
        values = (values.reshape(b, -1, G) * scale[..., None]).reshape(b, -1)
        values = torch.nn.functional.pad(values, (0, 1))  # the last index: the zero outside every item
        dims = self.dims.index_select(0, slots).long()
        A, B = self.shape
        a, bb = torch.arange(A)[:, None], torch.arange(B)[None, :]
        src_r, src_c = (bb, a) if self.transpose else (a, bb)
        r, cols = dims[:, 0, None, None], dims[:, 1, None, None]
        # an item's own groups end where its numbers do; past them (another item's scales) the mask below is what holds
        inside = (src_r < r) & (src_c < cols)
        idx = torch.where(inside, src_r * cols + src_c, torch.full_like(inside, values.shape[1] - 1, dtype=torch.long))
        return values.gather(1, idx.reshape(b, -1)).reshape(b, A, B).to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.code_at, self.scale_at,
                                                          self.maxima, self.dims))
