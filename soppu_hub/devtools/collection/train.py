"""Train one task's LoRA with PEFT on the real base, on the CPU: minibatches of chat turns, replies-only loss."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import torch

from ...compression.task_eval import chat_prompt_ids
from ...peft_format.layout import CONFIG_NAME
from .tasks import Pair, Task

BATCH = 8


def _batch(tokenizer, pairs: list[Pair], eos: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, mask and labels of chat turns; only the reply (and its end-of-turn token) is learned."""
    rows, labels = [], []
    for prompt, answer in pairs:
        p = chat_prompt_ids(tokenizer, prompt)
        r = tokenizer(answer + eos, add_special_tokens=False).input_ids
        rows.append(p + r)
        labels.append([-100] * len(p) + r)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return ids, mask, lab


def train_task(base_folder: Path, task: Task, train: list[Pair], out: Path, *, base_model: str, seed: int = 42,
               tick: Callable[[int], None] | None = None) -> float:
    """The task's LoRA (its PEFT config), AdamW over shuffled minibatches; saved as PEFT writes it, in the task's
    dtype, naming `base_model`. Returns the last minibatch's loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_folder))
    base = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32)
    torch.manual_seed(seed)  # what HF Trainer does (seed 42 by default) before PEFT initialises A
    config = LoraConfig(r=task.rank, lora_alpha=2 * task.rank, target_modules=list(task.targets), lora_dropout=0.05,
                        use_rslora=task.rslora, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=task.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=task.lr, total_steps=task.steps, pct_start=0.1)
    order = random.Random(seed)
    eos = tok.eos_token or ""
    model.train()
    loss = torch.tensor(0.0)
    pool: list[Pair] = []
    for _ in range(task.steps):
        if len(pool) < BATCH:
            pool += order.sample(train, len(train))
        chunk, pool = pool[:BATCH], pool[BATCH:]
        ids, mask, labels = _batch(tok, chunk, eos)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if tick:
            tick(1)
    model.eval()
    if task.dtype != "float32":
        model = model.to(getattr(torch, task.dtype))
    model.save_pretrained(str(out))
    path = out / CONFIG_NAME
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base_model
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT writes a set, in hash order
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return float(loss.detach())
