"""Functional check: does the compressed adapter make the base model predict what the original did?"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .hub import model_folder

PROBE_PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Q: What is 12 times 7?\nA:",
    "Translate to German: Good morning, how are you?",
    "Explain in one sentence why the sky is blue.",
    "def fibonacci(n):",
]


REPLY_TOKENS = 24  # length of the original adapter's greedy reply the compressed one is checked along


def chat_prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """The prompt as the model meets it in use: a user turn in the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def reply_agreement(original, compressed, tokenizer, prompts: list[str], new_tokens: int = REPLY_TOKENS) -> tuple[float, int]:
    """(share, positions): the original adapter writes its greedy reply to each prompt; how often is the compressed
    adapter's top next token the original's along that reply? `original`/`compressed` switch the model's adapter."""
    hits = total = 0
    for p in prompts:
        ids = chat_prompt_ids(tokenizer, p)
        model = original()
        reply = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        n = reply.shape[1] - ids.shape[1]
        if n == 0:
            continue
        want = model(input_ids=reply).logits[0, ids.shape[1] - 1: -1].argmax(-1)
        got = compressed()(input_ids=reply).logits[0, ids.shape[1] - 1: -1].argmax(-1)
        hits += int((want == got).sum())
        total += n
    return (hits / total if total else 1.0), total


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Log-probabilities of the next token at every prompt position, concatenated: (positions, vocab)."""
    out = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt").input_ids
        out.append(torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1))
    return torch.cat(out)


def verify_adapters(base: str | Path, originals: list[Path], compressed: list[Path], *,
                    prompts: list[str] = PROBE_PROMPTS, token: str | bool | None = None,
                    progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Per adapter: next-token agreement and mean KL(original || compressed) over all probe prompt positions, and
    the agreement along the original's greedy reply to each probe (in the chat template when there is one)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder(str(base), token=token)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    base_lp = next_token_logprobs(model, tokenizer, prompts)
    results = []
    for orig, comp in zip(originals, compressed):
        peft_model = PeftModel.from_pretrained(model, str(orig), adapter_name="original").eval()
        peft_model.load_adapter(str(comp), adapter_name="compressed")
        peft_model.set_adapter("original")
        lp_o = next_token_logprobs(peft_model, tokenizer, prompts)
        peft_model.set_adapter("compressed")
        lp_c = next_token_logprobs(peft_model, tokenizer, prompts)

        def use(name: str):
            peft_model.set_adapter(name)
            return peft_model

        reply, reply_positions = reply_agreement(lambda: use("original"), lambda: use("compressed"), tokenizer, prompts)
        model = peft_model.unload()  # back to the plain base model for the next adapter
        kl = (lp_o.exp() * (lp_o - lp_c)).sum(-1)
        results.append({
            "prompts": len(prompts),
            "positions": int(lp_o.shape[0]),
            "next_token_agreement": float((lp_o.argmax(-1) == lp_c.argmax(-1)).float().mean()),
            "mean_kl": float(kl.mean()),
            "base_agreement": float((lp_o.argmax(-1) == base_lp.argmax(-1)).float().mean()),
            "reply_agreement": reply,
            "reply_positions": reply_positions,
        })
        if progress:
            progress(len(results), len(originals))
    return results
