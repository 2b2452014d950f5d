"""Functional check: does the compressed adapter make the base model predict what the original did?"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .replies import greedy_tokens

PROBE_PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Q: What is 12 times 7?\nA:",
    "Translate to German: Good morning, how are you?",
    "Explain in one sentence why the sky is blue.",
    "def fibonacci(n):",
]


REPLY_TOKENS = 24  # length of the original adapter's greedy reply the compressed one is checked along


def reply_sequences(
    model, tokenizer, prompts: list[str], new_tokens: int = REPLY_TOKENS
) -> list[tuple[torch.Tensor, int]]:
    """(prompt + greedy reply ids, prompt length) per prompt, as `model` (the original adapter) writes them."""
    return [
        (torch.tensor([ids + reply]), len(ids))
        for ids, reply in greedy_tokens(model, tokenizer, prompts, max_new_tokens=new_tokens)
    ]


@torch.no_grad()
def reply_choices(model, replies: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """The model's top next token at every reply position (teacher-forced along the given replies)."""
    picks = [model(input_ids=ids).logits[0, n - 1 : -1].argmax(-1) for ids, n in replies if ids.shape[1] > n]
    return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Log-probabilities of the next token at every prompt position, concatenated: (positions, vocab)."""
    out = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt").input_ids
        out.append(torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1))
    return torch.cat(out)


def verify_adapters(
    base_folder: Path,
    originals: list[Path],
    compressed: list[Path],
    *,
    prompts: list[str] | None = None,
    variants: dict[int, list[Path]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Per adapter: next-token agreement and mean KL(original || compressed) over all probe prompt positions, and
    the agreement along the original's greedy reply to each probe (in the chat template when there is one).

    `variants`: more exports of each adapter (e.g. the same fit at smaller shared ranks, keyed by rank), scored
    the same way into "by_rank"; the original's predictions and replies are computed once for all of them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = prompts or PROBE_PROMPTS
    tokenizer = AutoTokenizer.from_pretrained(str(base_folder))
    model = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32).eval()
    base_lp = next_token_logprobs(model, tokenizer, prompts)
    variants = variants or {}
    results = []
    for i, (orig, comp) in enumerate(zip(originals, compressed)):
        peft_model = PeftModel.from_pretrained(model, str(orig), adapter_name="original").eval()
        lp_o = next_token_logprobs(peft_model, tokenizer, prompts)
        replies = reply_sequences(peft_model, tokenizer, prompts)
        want = reply_choices(peft_model, replies)

        def score(
            name: str, path: Path, peft_model=peft_model, replies=replies, want=want
        ) -> tuple[torch.Tensor, float]:
            peft_model.load_adapter(str(path), adapter_name=name)
            peft_model.set_adapter(name)
            lp = next_token_logprobs(peft_model, tokenizer, prompts)
            got = reply_choices(peft_model, replies)
            return lp, float((want == got).float().mean()) if len(want) else 1.0

        lp_c, reply = score("compressed", comp)
        by_rank = {}
        for rank, paths in sorted(variants.items()):
            lp_r, reply_r = score(f"rank{rank}", paths[i])
            by_rank[str(rank)] = {
                "next_token_agreement": float((lp_o.argmax(-1) == lp_r.argmax(-1)).float().mean()),
                "reply_agreement": reply_r,
            }
        model = peft_model.unload()  # back to the plain base model for the next adapter
        kl = (lp_o.exp() * (lp_o - lp_c)).sum(-1)
        results.append(
            {
                "prompts": len(prompts),
                "reply_tokens": REPLY_TOKENS,
                "positions": int(lp_o.shape[0]),
                "next_token_agreement": float((lp_o.argmax(-1) == lp_c.argmax(-1)).float().mean()),
                "mean_kl": float(kl.mean()),
                "base_agreement": float((lp_o.argmax(-1) == base_lp.argmax(-1)).float().mean()),
                "reply_agreement": reply,
                "reply_positions": int(len(want)),
                **({"by_rank": by_rank} if by_rank else {}),
            }
        )
        if progress:
            progress(len(results), len(originals))
    return results
