"""Task scores on examples with answers: greedy replies to each prompt, scored by exact match and chrF.

What a user means by "does my adapter still do its job": the reply to each of their prompts (as a chat turn
when the tokenizer has a chat template), compared with the expected answer. Exact match after trimming
whitespace, and chrF (character n-gram F-score, beta 2, n up to 6, as sacrebleu's chrF without word n-grams) for
partial credit.
"""

from __future__ import annotations

from collections import Counter

import torch

CHRF_ORDER, CHRF_BETA = 6, 2.0


def exact_match(reply: str, answer: str) -> bool:
    return " ".join(reply.split()) == " ".join(answer.split())


def chrf(reply: str, answer: str) -> float:
    """Character n-gram F-score of `reply` against `answer` in [0, 1] (whitespace ignored, as chrF does)."""
    hyp, ref = "".join(reply.split()), "".join(answer.split())
    if not ref:
        return float(not hyp)
    precisions, recalls = [], []
    for n in range(1, CHRF_ORDER + 1):
        h = Counter(hyp[i:i + n] for i in range(len(hyp) - n + 1))
        r = Counter(ref[i:i + n] for i in range(len(ref) - n + 1))
        if not r:
            continue
        common = sum((h & r).values())
        precisions.append(common / sum(h.values()) if h else 0.0)
        recalls.append(common / sum(r.values()))
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if p + r == 0:
        return 0.0
    b2 = CHRF_BETA**2
    return (1 + b2) * p * r / (b2 * p + r)


def score(replies: list[str], answers: list[str]) -> dict:
    """{"examples", "exact_match", "chrf"}: means over the examples."""
    n = len(answers)
    return {"examples": n, "exact_match": sum(map(exact_match, replies, answers)) / n,
            "chrf": sum(map(chrf, replies, answers)) / n}


def chat_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the user's turn of a chat (the model's own template), or as it is without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 48, batch: int = 16) -> list[str]:
    """Each prompt's greedy reply, decoded without special tokens and trimmed; prompts run `batch` at a time."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch):
            texts = [chat_prompt(tokenizer, p) for p in prompts[i:i + batch]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            out += [t.strip() for t in tokenizer.batch_decode(gen[:, enc.input_ids.shape[1]:], skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return out
