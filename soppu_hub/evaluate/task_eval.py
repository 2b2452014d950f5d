"""Task scores on examples with answers: greedy replies to each prompt, scored by exact match and chrF.

What a user means by "does my adapter still do its job": the reply to each of their prompts (as a chat turn
when the tokenizer has a chat template), compared with the expected answer. Exact match after trimming
whitespace, and chrF (character n-gram F-score, beta 2, n up to 6, as sacrebleu's chrF without word n-grams) for
partial credit.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import EvalFileError
from .replies import greedy_replies

CHRF_ORDER, CHRF_BETA = 6, 2.0
SAMPLES = 4  # examples whose replies (original and compressed) the report and the card show
Pair = tuple[str, str]  # (prompt, expected answer)


def exact_match(reply: str, answer: str) -> bool:
    return " ".join(reply.split()) == " ".join(answer.split())


def chrf(reply: str, answer: str) -> float:
    """Character n-gram F-score of `reply` against `answer` in [0, 1] (whitespace ignored, as chrF does)."""
    hyp, ref = "".join(reply.split()), "".join(answer.split())
    if not ref:
        return float(not hyp)
    precisions, recalls = [], []
    for n in range(1, CHRF_ORDER + 1):
        h = Counter(hyp[i : i + n] for i in range(len(hyp) - n + 1))
        r = Counter(ref[i : i + n] for i in range(len(ref) - n + 1))
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
    return {
        "examples": n,
        "exact_match": sum(map(exact_match, replies, answers)) / n,
        "chrf": sum(map(chrf, replies, answers)) / n,
    }


def read_eval_file(path: str | Path) -> list[Pair]:
    """JSONL, one {"prompt": str, "answer": str} a line (blank lines skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalFileError(
            f"cannot read eval file {path} ({type(e).__name__}); give a JSONL file of "
            '{"prompt": ..., "answer": ...} lines'
        ) from None
    pairs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise EvalFileError(f'{path}:{n}: not JSON; each line must be {{"prompt": ..., "answer": ...}}') from None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("prompt"), str)
            or not isinstance(row.get("answer"), str)
            or not row["prompt"].strip()
        ):
            raise EvalFileError(f'{path}:{n}: needs a non-empty string "prompt" and a string "answer"')
        pairs.append((row["prompt"], row["answer"]))
    if not pairs:
        raise EvalFileError(f'eval file {path} has no examples; give one {{"prompt", "answer"}} object a line')
    return pairs


def eval_sets(path: str | Path, names: list[str]) -> list[list[Pair] | None]:
    """Each adapter's examples: one file for all, or a folder with `<adapter name>.jsonl` per adapter (an adapter
    without a file is not scored; a folder that has none for any adapter is refused)."""
    path = Path(path)
    if not path.is_dir():
        pairs = read_eval_file(path)
        return [pairs for _ in names]
    sets = [read_eval_file(path / f"{n}.jsonl") if (path / f"{n}.jsonl").is_file() else None for n in names]
    if not any(sets):
        raise EvalFileError(
            f"eval folder {path} has no <adapter>.jsonl for any of the adapters "
            f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        )
    return sets


def read_probe_file(path: str | Path) -> list[str]:
    """Probe prompts for --verify: one a line, or JSONL with a "prompt" per line."""
    path = Path(path)
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise EvalFileError(f"cannot read probe file {path} ({type(e).__name__}); give one prompt a line") from None
    if not lines:
        raise EvalFileError(f"probe file {path} is empty; give one prompt a line")
    if path.suffix != ".jsonl":
        return lines
    return [_prompt_only(path, n, line) for n, line in enumerate(lines, 1)]


def _prompt_only(path: Path, n: int, line: str) -> str:
    try:
        row = json.loads(line)
    except ValueError:
        raise EvalFileError(f'{path}:{n}: not JSON; each line must be {{"prompt": ...}}') from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise EvalFileError(f'{path}:{n}: needs a non-empty string "prompt"')
    return row["prompt"]


class Scorer:
    """The base model loaded once; scores it alone or with one adapter folder at a time on a set of examples."""

    def __init__(self, base_folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(base_folder))
        self.model = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32).eval()

    def __call__(self, adapter: Path | None, pairs: list[Pair]) -> dict:
        return score(self.replies(adapter, pairs), [a for _, a in pairs])

    def replies(self, adapter: Path | None, pairs: list[Pair]) -> list[str]:
        """The greedy reply to each prompt, up to 8 tokens longer than the longest answer."""
        from peft import PeftModel

        prompts = [p for p, _ in pairs]
        longest = max(len(self.tokenizer(a, add_special_tokens=False).input_ids) for _, a in pairs) + 8
        if adapter is None:
            return greedy_replies(self.model, self.tokenizer, prompts, max_new_tokens=longest)
        peft_model = PeftModel.from_pretrained(self.model, str(adapter)).eval()
        try:
            return greedy_replies(peft_model, self.tokenizer, prompts, max_new_tokens=longest)
        finally:
            self.model = peft_model.unload()


def retention(compressed: dict, original: dict, key: str = "chrf") -> float | None:
    """How much of the original's score the compressed adapter keeps (None when the original scores 0)."""
    return compressed[key] / original[key] if original[key] else None


def evaluate_adapters(
    base_folder: Path,
    originals: list[Path],
    compressed: list[Path],
    sets: list[list[Pair] | None],
    progress: Callable[[int, int], None] | None = None,
) -> list[dict | None]:
    """Per adapter with examples: the base model's, the original's and the compressed adapter's scores, how much
    of the original's score the compressed one keeps (chrF and exact match ratios), and both replies to the first
    few examples."""
    scorer = Scorer(base_folder)
    base_scores: dict[int, dict] = {}
    results: list[dict | None] = []
    for i, (orig, comp, pairs) in enumerate(zip(originals, compressed, sets)):
        if not pairs:
            results.append(None)
            continue
        if id(pairs) not in base_scores:
            base_scores[id(pairs)] = scorer(None, pairs)
        answers = [a for _, a in pairs]
        said = {"original": scorer.replies(orig, pairs), "compressed": scorer.replies(comp, pairs)}
        o, c = score(said["original"], answers), score(said["compressed"], answers)
        samples = [
            {"prompt": p, "answer": a, "original": r, "compressed": k}
            for (p, a), r, k in list(zip(pairs, said["original"], said["compressed"]))[:SAMPLES]
        ]
        results.append(
            {
                "examples": len(pairs),
                "base": base_scores[id(pairs)],
                "original": o,
                "compressed": c,
                "chrf_retention": retention(c, o),
                "exact_match_retention": retention(c, o, "exact_match"),
                "samples": samples,
            }
        )
        if progress:
            progress(i + 1, len(originals))
    return results
