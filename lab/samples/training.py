"""Train the sample collection on the CPU: a small Llama that answers the demo prompts, then one LoRA per style.

Honest and small: the base model learns the plain answers to the prompts in `texts` (plus every styled
answer as plain text, as a real base model has read pirate talk somewhere) and the adapters learn, with
PEFT, to answer in their style. Seeds, thread count and deterministic kernels are fixed, so a rebuild on
the same machine writes the same bytes.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from lab.samples.synthetic import CHAT_TEMPLATE, build_tokenizer, tiny_llama_config
from lab.samples.texts import DIALOGUES, STYLES, Style, answers
from soppu_hub.peft_format.layout import CONFIG_NAME

Tick = Callable[[int], None]  # advance a progress bar by n steps


def chat_pairs(style: Style | None) -> list[tuple[str, str]]:
    """(prompt text up to the assistant turn, reply text) for every demo prompt, rendered by the chat template."""
    from jinja2 import Template

    t = Template(CHAT_TEMPLATE)
    out = []
    for (q, _), a in zip(DIALOGUES, answers(style)):
        prompt = t.render(messages=[{"role": "user", "content": q}], add_generation_prompt=True)
        out.append((prompt, a + "</s>\n"))
    return out


def corpus() -> list[str]:
    """Everything the tokenizer is trained on: all prompts and all answers, plain and styled."""
    texts = [q for q, _ in DIALOGUES] + answers(None)
    for s in STYLES:
        texts += answers(s)
    return texts


def _batch(
    tokenizer, pairs: list[tuple[str, str]], replies_only: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (prompt and padding masked out when replies_only)."""
    rows, labels = [], []
    for prompt, reply in pairs:
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        r = tokenizer(reply, add_special_tokens=False).input_ids
        rows.append(p + r)
        labels.append(([-100] * len(p) if replies_only else p) + r)
    return right_padded(rows, labels, tokenizer.pad_token_id)


def right_padded(
    rows: list[list[int]], labels: list[list[int]], pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, labels) of token rows, right-padded to the longest; padding is never learned."""
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    return ids, mask, lab


def train_steps(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    *,
    steps: int,
    lr: float,
    seed: int,
    replies_only: bool,
    tick: Tick | None = None,
) -> float:
    """Full-batch AdamW with a cosine schedule; returns the last loss."""
    torch.manual_seed(seed)
    batch = _batch(tokenizer, pairs, replies_only)
    return optimise(model, itertools.repeat(batch), steps=steps, lr=lr, tick=tick)


def optimise(
    model,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    tick: Tick | None = None,
) -> float:
    """AdamW with a one-cycle schedule over `steps` (ids, mask, labels) batches; returns the last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    loss = torch.tensor(0.0)
    for _, (ids, mask, labels) in zip(range(steps), batches):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if tick:
            tick(1)
    model.eval()
    return float(loss.detach())


def save_lora(model, out: Path, *, dtype: str, base_model: str) -> None:
    """The PEFT model saved as PEFT writes it, in `dtype`, its config naming `base_model` with sorted targets."""
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(out))
    path = out / CONFIG_NAME
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base_model
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT writes a set, in hash order
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def base_pairs() -> list[tuple[str, str]]:
    """The base model's data: the plain dialogues, plus every styled answer as bare text (no chat turns)."""
    plain = chat_pairs(None)
    styled = [("", a + "\n") for s in STYLES for a in answers(s)[s.rank % 3 :: 3]]  # a third of each, for its words
    return plain * 2 + styled


def build_base(
    folder: str | Path, *, hidden: int, layers: int, vocab: int, steps: int, seed: int, tick: Tick | None = None
) -> float:
    """Tokenizer + Llama trained from scratch on `base_pairs`; saved with save_pretrained (fp32)."""
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    tok = build_tokenizer(folder, vocab_size=vocab, extra_corpus=corpus())
    config = tiny_llama_config(tok, hidden=hidden, layers=layers, intermediate=3 * hidden, positions=256)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    loss = train_steps(model, tok, base_pairs(), steps=steps, lr=3e-3, seed=seed, replies_only=False, tick=tick)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(folder), safe_serialization=True)
    return loss


def train_adapter(
    base_folder: Path, style: Style, out: Path, *, base_model: str, steps: int, seed: int, tick: Tick | None = None
) -> float:
    """One LoRA with the style's PEFT config, trained on the styled replies only; saved as PEFT writes it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_folder))
    base = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32)
    torch.manual_seed(seed)  # what HF Trainer does (seed=42 by default) before PEFT initialises A
    config = LoraConfig(
        r=style.rank,
        lora_alpha=style.alpha,
        target_modules=list(style.targets),
        lora_dropout=style.dropout,
        use_rslora=style.rslora,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    loss = train_steps(model, tok, chat_pairs(style), steps=steps, lr=style.lr, seed=seed, replies_only=True, tick=tick)
    save_lora(model, out, dtype=style.dtype, base_model=base_model)
    return loss
