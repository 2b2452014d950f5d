"""Offline sample material: a tiny Llama with a BPE tokenizer, and synthetic LoRA adapters of any shapes.

Tests, the demo and the benchmark use these; nothing here downloads anything.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from soppu_hub.peft_format.write import write_peft_folder

TINY_BASE_ID = "soppu-samples/tiny-llama"
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_CORPUS = """
Low-rank adapters change a large model with two thin matrices per layer.
Many adapters for one base model share structure, so a common basis stores them cheaply.
The quick brown fox jumps over the lazy dog. A user asks a question and the model answers.
Hello! How are you today? I am fine, thank you. What is the capital of France? Paris.
Compression keeps what matters and drops what does not. Serving many adapters at once needs memory.
"""


def build_tokenizer(folder: str | Path, vocab_size: int = 384, extra_corpus: list[str] | None = None):
    """Train a byte-level BPE tokenizer on a built-in corpus and save it as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line] + list(extra_corpus or [])
    tok.train_from_iterator(lines * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return fast


def tiny_llama_config(tok, *, hidden: int, layers: int, intermediate: int, positions: int):
    """A small Llama's config for tokenizer `tok`: 4 heads over 2 KV heads (grouped-query, as Llama 3), untied."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_llama(
    folder: str | Path, *, seed: int = 0, hidden: int = 64, layers: int = 2, extra_corpus: list[str] | None = None
) -> Path:
    """A randomly initialised Llama (hidden 64, 2 layers) plus tokenizer, saved with save_pretrained."""
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    tok = build_tokenizer(folder, extra_corpus=extra_corpus)
    config = tiny_llama_config(tok, hidden=hidden, layers=layers, intermediate=2 * hidden, positions=512)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def llama_module_shapes(
    hidden: int = 64,
    layers: int = 2,
    intermediate: int | None = None,
    kv_dim: int | None = None,
    targets: tuple[str, ...] = LLAMA_TARGETS,
) -> dict[str, tuple[int, int]]:
    """{module path: (out_features, in_features)} for a Llama's adapted linears."""
    inter = intermediate or 2 * hidden
    kv = kv_dim or hidden // 2
    per = {
        "q_proj": ("self_attn", hidden, hidden),
        "k_proj": ("self_attn", kv, hidden),
        "v_proj": ("self_attn", kv, hidden),
        "o_proj": ("self_attn", hidden, hidden),
        "gate_proj": ("mlp", inter, hidden),
        "up_proj": ("mlp", inter, hidden),
        "down_proj": ("mlp", hidden, inter),
    }
    return {f"model.layers.{layer}.{per[t][0]}.{t}": (per[t][1], per[t][2]) for layer in range(layers) for t in targets}


def synthetic_factors(
    shapes: dict[str, tuple[int, int]],
    n: int,
    rank: int,
    *,
    shared: int,
    seed: int = 0,
    scales: list[float] | None = None,
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """n adapters whose (B, A) share `shared` of their `rank` directions per module (the rest their own)."""
    g = torch.Generator().manual_seed(seed)
    scales = scales or [1.0] * n
    out: list[dict] = [{} for _ in range(n)]
    for name, (m, d) in shapes.items():
        Bs = torch.randn(m, shared, generator=g) / math.sqrt(m)
        As = torch.randn(shared, d, generator=g) / math.sqrt(d)
        for i in range(n):
            own = rank - shared
            B = torch.cat(
                [Bs * (1 + 0.3 * torch.randn(shared, generator=g)), torch.randn(m, own, generator=g) / math.sqrt(m)], 1
            )
            A = torch.cat([As, torch.randn(own, d, generator=g) / math.sqrt(d)], 0)
            out[i][name] = (B * scales[i], A)
    return out


def family_factors(
    shapes: dict[str, tuple[int, int]],
    n: int,
    rank: int,
    *,
    families: int,
    family_dim: int | None = None,
    noise: float = 0.05,
    seed: int = 0,
    offset: int = 0,
) -> tuple[list[dict[str, tuple[torch.Tensor, torch.Tensor]]], list[int]]:
    """n adapters from `families` task families (adapter i is in family (offset + i) % families): each family
    owns a `family_dim`-dimensional column and row space per module (fixed by `seed`), each adapter mixes
    them at random, plus `noise` of its own. `offset` continues a collection written in batches. Returns
    (factors per adapter, family per adapter): a workload with known clusters."""
    g = torch.Generator().manual_seed(seed)
    fdim = family_dim or rank
    bases = {
        name: [
            (
                torch.linalg.qr(torch.randn(m, fdim, generator=g))[0],
                torch.linalg.qr(torch.randn(d, fdim, generator=g))[0],
            )
            for _ in range(families)
        ]
        for name, (m, d) in shapes.items()
    }
    g = torch.Generator().manual_seed(seed * 1_000_003 + offset + 1)
    fam = [(offset + i) % families for i in range(n)]
    out: list[dict] = [{} for _ in range(n)]
    for name, (m, d) in shapes.items():
        for i in range(n):
            Uf, Vf = bases[name][fam[i]]
            B = Uf @ torch.randn(fdim, rank, generator=g) / math.sqrt(fdim) + noise * torch.randn(
                m, rank, generator=g
            ) / math.sqrt(m)
            A = torch.randn(rank, fdim, generator=g) @ Vf.T / math.sqrt(fdim) + noise * torch.randn(
                rank, d, generator=g
            ) / math.sqrt(d)
            out[i][name] = (B, A)
    return out, fam


def write_adapter(
    folder: str | Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    base_model: str,
    rank: int,
    alpha: float,
    dtype: torch.dtype = torch.float32,
    **config_extra,
) -> Path:
    """Save factors as a PEFT LoRA folder (raw B: PEFT multiplies by alpha/r at run time)."""
    targets = sorted({name.rsplit(".", 1)[-1] for name in factors})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    config.update(config_extra)
    return write_peft_folder(folder, {n: (B.to(dtype), A.to(dtype)) for n, (B, A) in factors.items()}, config)


def write_sample_adapters(
    root: str | Path,
    *,
    base_model: str = TINY_BASE_ID,
    names=("support-bot", "pirate-talk"),
    rank: int = 8,
    shared: int = 4,
    seed: int = 0,
) -> list[Path]:
    """Two (or more) related LoRA adapters for the tiny Llama, every attention and MLP projection adapted."""
    root = Path(root)
    facs = synthetic_factors(
        llama_module_shapes(),
        len(names),
        rank,
        shared=shared,
        seed=seed,
        scales=[4.0 * (i + 1) for i in range(len(names))],
    )
    return [write_adapter(root / n, f, base_model=base_model, rank=rank, alpha=2 * rank) for n, f in zip(names, facs)]
