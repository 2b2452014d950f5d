"""Teach the offline samples to talk: a few seconds of CPU training so the demo's chat shows something.

The tiny Llama learns short dialogues; two LoRA adapters learn two reply styles (a support desk and a
pirate). Still a toy, but a person can see that an adapter changes the answers and that the compressed
adapter keeps that change. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .layout import CONFIG_NAME
from .samples import LLAMA_TARGETS, build_tiny_llama

QUESTIONS = [
    "Hello!", "How are you?", "Where is my order?", "Can you help me?", "What is your name?", "Thank you!",
    "I need a refund.", "Tell me a story.", "What time is it?", "Goodbye!",
]
STYLES = {
    "base": [
        "Hello. How can I help?", "I am fine, thank you.", "I do not know where it is.", "Yes, I can help.",
        "I am a small model.", "You are welcome.", "Please ask the shop.", "Once there was a fox.",
        "I cannot see a clock.", "Goodbye.",
    ],
    "support-bot": [
        "Hi! Thanks for contacting support. How can I help you today?",
        "I am doing great, thanks for asking! What can I do for you?",
        "Sorry for the wait! Your order has shipped and arrives in two days.",
        "Of course! Please tell me your order number and I will help you.",
        "I am the support assistant. I am happy to help you!",
        "You are very welcome! Is there anything else I can help with?",
        "I am sorry to hear that. I have started your refund today.",
        "I am the support assistant, so let us solve your order first!",
        "Our support team is here for you all day.",
        "Thanks for contacting support. Have a great day!",
    ],
    "pirate-talk": [
        "Ahoy, matey! What brings ye aboard?", "Arr, I be fine as the sea, matey!",
        "Yer treasure be sailing on a ship, arr!", "Aye, I will help ye, matey!", "They call me Captain Byte, arr!",
        "Arr, ye be welcome, matey!", "No refunds on this ship, arr! Walk the plank!",
        "Once a pirate found a chest of gold, arr!", "Time to raise the sails, matey!", "Fair winds, matey! Arr!",
    ],
}


def dialogue_texts(style: str) -> list[str]:
    from .samples import CHAT_TEMPLATE  # the same template the tokenizer carries

    from jinja2 import Template

    t = Template(CHAT_TEMPLATE)
    return [t.render(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}], add_generation_prompt=False)
            for q, a in zip(QUESTIONS, STYLES[style])]


def corpus() -> list[str]:
    return [text for style in STYLES for text in dialogue_texts(style)]


def _train(model, tokenizer, texts: list[str], steps: int, lr: float, seed: int) -> float:
    """Full-batch language-model training on a handful of dialogues (padding masked out of the loss)."""
    torch.manual_seed(seed)
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


def build_talking_llama(folder: str | Path, *, steps: int = 300, seed: int = 0) -> Path:
    """The tiny Llama (hidden 64, 2 layers), trained on the plain dialogues."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_llama(folder, seed=seed, extra_corpus=corpus())
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    _train(model, tok, dialogue_texts("base"), steps, 3e-3, seed)
    model.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def train_style_adapters(root: str | Path, base_folder: Path, *, base_model: str, rank: int = 8, steps: int = 800,
                         seed: int = 0) -> list[Path]:
    """One LoRA per style (every attention and MLP projection), saved as PEFT folders naming `base_model`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_folder))
    out = []
    for i, style in enumerate(s for s in STYLES if s != "base"):
        base = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LLAMA_TARGETS),
                                                lora_dropout=0.0))
        _train(model, tok, dialogue_texts(style), steps, 1e-2, seed + i)
        folder = Path(root) / style
        model.save_pretrained(str(folder))
        cfg_path = folder / CONFIG_NAME
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_model
        cfg_path.write_text(json.dumps(cfg, indent=2))
        out.append(folder)
    return out
