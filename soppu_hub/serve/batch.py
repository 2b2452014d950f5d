"""The running batch: its rows' shared left-padded KV cache, and each row's sampler."""

from __future__ import annotations

import random

import torch

from .params import Sampling


class Sampler:
    """How one row picks its next token: HF's logits processors and warpers for its settings, its own seeded
    generator when it samples."""

    def __init__(self, sampling: Sampling, prompt_ids: list[int]) -> None:
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
            TypicalLogitsWarper,
        )

        sp = sampling
        self.prompt_ids = prompt_ids
        self.seed = (sp.seed if sp.seed is not None else random.randrange(2**31)) if sp.do_sample else None
        self.generator = torch.Generator().manual_seed(self.seed) if sp.do_sample else None
        procs = LogitsProcessorList()
        if sp.repetition_penalty:
            procs.append(RepetitionPenaltyLogitsProcessor(sp.repetition_penalty))
        if sp.do_sample:  # the warpers HF generate would use for these settings, in its order
            if sp.temperature and sp.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(sp.temperature))
            if sp.top_k:
                procs.append(TopKLogitsWarper(sp.top_k))
            if sp.top_p and sp.top_p < 1.0:
                procs.append(TopPLogitsWarper(sp.top_p))
            if sp.typical_p and sp.typical_p < 1.0:
                procs.append(TypicalLogitsWarper(sp.typical_p))
        self.procs = procs

    @property
    def plain_greedy(self) -> bool:
        return self.generator is None and not self.procs

    def pick(self, logits: torch.Tensor, tokens: list[int]) -> tuple[int, float]:
        """(token id, its log-probability under the processed distribution) from this row's last logits."""
        history = torch.tensor([self.prompt_ids + tokens])
        scores = self.procs(history, logits[None].float())[0] if self.procs else logits.float()
        logprobs = torch.log_softmax(scores, dim=-1)
        if self.generator is None:
            tid = int(scores.argmax())
        else:
            tid = int(torch.multinomial(logprobs.exp(), 1, generator=self.generator))
        return tid, float(logprobs[tid])


def pick_all(rows: list, logits: torch.Tensor) -> list[tuple[int, float]]:
    """Every row's next token: plain greedy rows in one vectorised argmax, the others through their sampler."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = logprobs.argmax(-1).tolist()
    return [
        (best[r], float(logprobs[r, best[r]])) if row.sampler.plain_greedy else row.sampler.pick(logits[r], row.tokens)
        for r, row in enumerate(rows)
    ]


class Batch:
    """The running rows (the engine's Generations), their shared KV cache (left-padded) and attention mask."""

    def __init__(self) -> None:
        self.rows: list = []
        self.cache = None  # transformers DynamicCache
        self.mask = torch.zeros(0, 0, dtype=torch.long)

    def merge(self, rows: list, cache, mask: torch.Tensor) -> None:
        """Add newly prefilled rows: both caches left-padded to one length, then stacked on the batch axis."""
        if not self.rows:
            self.rows, self.cache, self.mask = rows, cache, mask
            return
        from transformers import DynamicCache

        width = max(self.mask.shape[1], mask.shape[1])

        def pad(t: torch.Tensor, n: int) -> torch.Tensor:  # left-pad the time axis (dim -2 of k/v, dim 1 of masks)
            return torch.nn.functional.pad(t, (0, 0, n, 0)) if t.dim() == 4 else torch.nn.functional.pad(t, (n, 0))

        merged = DynamicCache()
        for i, (old, new) in enumerate(zip(self.cache.layers, cache.layers)):
            k = torch.cat([pad(old.keys, width - self.mask.shape[1]), pad(new.keys, width - mask.shape[1])])
            v = torch.cat([pad(old.values, width - self.mask.shape[1]), pad(new.values, width - mask.shape[1])])
            merged.update(k, v, i)
        self.mask = torch.cat([pad(self.mask, width - self.mask.shape[1]), pad(mask, width - mask.shape[1])])
        self.rows, self.cache = self.rows + rows, merged

    def drop_finished(self) -> None:
        """Rows whose job is closed leave the batch; columns no remaining row attends to are cut from the left."""
        keep = [i for i, row in enumerate(self.rows) if not row.closed]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, torch.zeros(0, 0, dtype=torch.long)
            return
        idx = torch.tensor(keep)
        self.mask = self.mask[idx]
        start = int((self.mask.sum(0) > 0).nonzero()[0]) if self.mask.any() else 0
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[idx.to(layer.keys.device), :, start:]
            layer.values = layer.values[idx.to(layer.values.device), :, start:]
