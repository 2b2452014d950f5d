"""Offline sample material: synthetic adapters for tests and benchmarks, and the trained sample collection.

Nothing here downloads anything. `synthetic` makes random-but-structured LoRA factors of any shape; the
committed collection (`collection`) is a small Llama that talks plus a dozen LoRA adapters trained on it.
"""

from lab.samples.synthetic import (
    CHAT_TEMPLATE,
    LLAMA_TARGETS,
    TINY_BASE_ID,
    build_tiny_llama,
    build_tokenizer,
    family_factors,
    llama_module_shapes,
    synthetic_factors,
    write_adapter,
    write_sample_adapters,
)

__all__ = [
    "CHAT_TEMPLATE",
    "LLAMA_TARGETS",
    "TINY_BASE_ID",
    "build_tiny_llama",
    "build_tokenizer",
    "family_factors",
    "llama_module_shapes",
    "synthetic_factors",
    "write_adapter",
    "write_sample_adapters",
]
