"""Functional check: does the compressed adapter make the base model predict what the original did?"""

from __future__ import annotations

from pathlib import Path

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


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Log-probabilities of the next token at every prompt position, concatenated: (positions, vocab)."""
    out = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt").input_ids
        out.append(torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1))
    return torch.cat(out)


def verify_adapters(base: str | Path, originals: list[Path], compressed: list[Path], *,
                    prompts: list[str] = PROBE_PROMPTS, token: str | bool | None = None) -> list[dict]:
    """Per adapter: next-token agreement and mean KL(original || compressed) over all probe positions."""
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
        model = peft_model.unload()  # back to the plain base model for the next adapter
        kl = (lp_o.exp() * (lp_o - lp_c)).sum(-1)
        results.append({
            "prompts": len(prompts),
            "positions": int(lp_o.shape[0]),
            "next_token_agreement": float((lp_o.argmax(-1) == lp_c.argmax(-1)).float().mean()),
            "mean_kl": float(kl.mean()),
            "base_agreement": float((lp_o.argmax(-1) == base_lp.argmax(-1)).float().mean()),
        })
    return results
