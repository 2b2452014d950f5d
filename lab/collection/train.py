"""Train one task's LoRA with PEFT on the real base, on the CPU: minibatches of chat turns, replies-only loss."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import torch

from lab.collection.tasks import Pair, Task
from lab.samples.training import optimise, right_padded, save_lora
from soppu_hub.evaluate.replies import chat_prompt_ids

BATCH = 8


def _batch(tokenizer, pairs: list[Pair], eos: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, mask and labels of chat turns; only the reply (and its end-of-turn token) is learned."""
    rows, labels = [], []
    for prompt, answer in pairs:
        p = chat_prompt_ids(tokenizer, prompt)
        r = tokenizer(answer + eos, add_special_tokens=False).input_ids
        rows.append(p + r)
        labels.append([-100] * len(p) + r)
    return right_padded(rows, labels, tokenizer.pad_token_id)


def train_task(
    base_folder: Path,
    task: Task,
    train: list[Pair],
    out: Path,
    *,
    base_model: str,
    seed: int = 42,
    tick: Callable[[int], None] | None = None,
) -> float:
    """The task's LoRA (its PEFT config), AdamW over shuffled minibatches; saved as PEFT writes it, in the task's
    dtype, naming `base_model`. Returns the last minibatch's loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_folder))
    base = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32)
    torch.manual_seed(seed)  # what HF Trainer does (seed 42 by default) before PEFT initialises A
    config = LoraConfig(
        r=task.rank,
        lora_alpha=2 * task.rank,
        target_modules=list(task.targets),
        lora_dropout=0.05,
        use_rslora=task.rslora,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    order = random.Random(seed)
    eos = tok.eos_token or ""

    def batches():
        pool: list[Pair] = []
        while True:
            if len(pool) < BATCH:
                pool += order.sample(train, len(train))
            chunk, pool = pool[:BATCH], pool[BATCH:]
            yield _batch(tok, chunk, eos)

    loss = optimise(model, batches(), steps=task.steps, lr=task.lr, tick=tick)
    save_lora(model, out, dtype=task.dtype, base_model=base_model)
    return loss
