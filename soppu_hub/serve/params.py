"""A generation request's parameters, parsed and checked without a server: what LoRAX accepts, LoRAX's 422 wording."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import ValidationFailed

MAX_STOP_SEQUENCES = 4


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked (LoRAX's sampling parameters, with do_sample settled)."""

    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class GenerateRequest:
    """What one request asks the engine to generate, checked."""

    ids: list[int]  # prompt token ids, truncated as asked
    max_new: int
    sampling: Sampling
    stop: list[str]
    ignore_eos: bool = False


def number(params: dict, name: str, kind: type, ok: Callable[[float], bool], rule: str):
    """A numeric parameter, None when absent; anything else (a string, a bool, NaN, out of range) is a 422."""
    v = params.get(name)
    if v is None:
        return None
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or (kind is int and isinstance(v, float) and not v.is_integer())
        or v != v
        or v in (float("inf"), float("-inf"))
        or not ok(v)
    ):
        raise ValidationFailed(f"`{name}` must be {rule}. Given: {v!r}"[:200])
    return kind(v)


def parse_generate(
    inputs: object, params: dict, *, tokenize: Callable[[str], list[int]], max_total_tokens: int
) -> GenerateRequest:
    """LoRAX's /generate `inputs` + `parameters` -> what the engine runs; ValidationFailed (422) on anything else."""
    p = params
    if not isinstance(inputs, str) or not inputs:
        raise ValidationFailed("`inputs` must be a non-empty string")
    truncate = number(p, "truncate", int, lambda v: v > 0, "a positive integer")
    max_new = number(p, "max_new_tokens", int, lambda v: v > 0, "strictly positive")
    temperature = number(p, "temperature", float, lambda v: v >= 0, "a number >= 0")
    top_p = number(p, "top_p", float, lambda v: 0 < v <= 1, "in (0, 1]")
    top_k = number(p, "top_k", int, lambda v: v > 0, "a positive integer")
    typical_p = number(p, "typical_p", float, lambda v: 0 < v <= 1, "in (0, 1]")
    repetition_penalty = number(p, "repetition_penalty", float, lambda v: v > 0, "a number > 0")
    seed = number(p, "seed", int, lambda v: 0 <= v < 2**63, "an integer >= 0")
    if (number(p, "best_of", int, lambda v: v > 0, "a positive integer") or 1) > 1:
        raise ValidationFailed("`best_of` > 1 is not supported by this server")
    stop = p.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
        raise ValidationFailed("`stop` must be a list of strings")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise ValidationFailed(f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(stop)}")
    ids = tokenize(inputs)
    if truncate:
        ids = ids[-truncate:]
    if len(ids) >= max_total_tokens:
        raise ValidationFailed(f"`inputs` must have less than {max_total_tokens} tokens. Given: {len(ids)}")
    room = max_total_tokens - len(ids)
    if max_new is None:
        max_new = room
    if max_new > room:
        raise ValidationFailed(
            f"`inputs` tokens + `max_new_tokens` must be <= {max_total_tokens}. "
            f"Given: {len(ids)} `inputs` tokens and {max_new} `max_new_tokens`"
        )
    do_sample = (
        bool(p.get("do_sample"))
        or (temperature not in (None, 0, 1.0))
        or top_p not in (None, 1.0)
        or top_k is not None
        or typical_p is not None
    )
    if temperature == 0:
        do_sample = False
    sampling = Sampling(
        do_sample, temperature, top_k, top_p, typical_p, repetition_penalty, seed if do_sample else None
    )
    return GenerateRequest(ids, max_new, sampling, stop, bool(p.get("ignore_eos_token")))
