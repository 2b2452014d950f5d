"""A store's tensors as one safetensors file: as they are (a float store), or as quantize.pack's three blobs with
their JSON index in the file's metadata (a quantized store). Used by bundles and collections alike."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .quantize import Store, pack, unpack

QUANTIZED_KEY = "soppu-quantized"  # the metadata key holding a quantized file's index


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], label: str, store: Store | None = None) -> None:
    """A safetensors file of the store: as they are, or (a quantized store) as pack's blobs with its index as the
    metadata. One metadata key either way: safetensors writes a map in no fixed order, and byte-identical files are
    how a rerun knows a repo is unchanged."""
    if store is not None and store.quantized:
        blobs, index = pack(tensors, store.kind, group=store.group, whole=(".U", ".V"))
        save_file(blobs, str(path), metadata={QUANTIZED_KEY: index})
    else:
        save_file(tensors, str(path), metadata={"format": label})


def load_tensors(path: Path, store: Store | None) -> dict[str, torch.Tensor]:
    """save_tensors' tensors back (de-quantized for a quantized store); ValueError names a damaged tensor."""
    if store is None or not store.quantized:
        return load_file(str(path))
    with safe_open(str(path), "pt") as f:
        index = (f.metadata() or {}).get(QUANTIZED_KEY)
        blobs = {k: f.get_tensor(k) for k in f.keys()}
    if index is None:
        raise ValueError("it holds no quantization index")
    return unpack(blobs, index)
