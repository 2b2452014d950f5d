"""A prompt as the model meets it in use, and greedy replies to many prompts, batched: the one generator every
check uses (the backend has its own decoding loop); and the thread count the checks run a small model with."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

SMALL_MODEL_BYTES = 200 * 2**20  # weights on disk below this: one torch thread for the checks


@contextmanager
def threads_for(model_folder: Path) -> Iterator[None]:
    """One torch thread while checking a small model: its matmuls are too small to split, and on a busy machine
    (the demo runs a Hub, a backend and a Space beside its checks) a second thread's spin-waits cost far more than
    they save: the tiny demo's verify took 72 s with a test run beside it, 11.5 s with one thread."""
    size = sum(p.stat().st_size for p in Path(model_folder).glob("*.safetensors"))
    if not 0 < size < SMALL_MODEL_BYTES:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pad_id(tokenizer) -> int:
    """The id left padding uses: the tokenizer's pad token, else its end of sequence, else 0 (an id of 0 is a real
    pad id, not a missing one). The attention mask hides it either way."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as the model meets it in use: the user's turn of a chat in the model's own template, or the
    plain text (special tokens as the tokenizer adds them) when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
        )
    return tokenizer(prompt).input_ids


@torch.no_grad()
def greedy_tokens(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch: int = 64
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy reply ids) per prompt; prompts run `batch` at a time, left-padded."""
    pad = pad_id(tokenizer)
    out: list[tuple[list[int], list[int]]] = []
    for i in range(0, len(prompts), batch):
        rows = [chat_prompt_ids(tokenizer, p) for p in prompts[i : i + batch]]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
        )
        for r, reply in zip(rows, gen[:, width:].tolist()):
            eos = tokenizer.eos_token_id
            out.append((r, reply[: reply.index(eos) + 1] if eos in reply else reply))  # nothing after the end
    return out


def greedy_replies(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 48, batch: int = 64) -> list[str]:
    """Each prompt's greedy reply, decoded without special tokens and trimmed."""
    return [
        tokenizer.decode(reply, skip_special_tokens=True).strip()
        for _, reply in greedy_tokens(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch=batch)
    ]
