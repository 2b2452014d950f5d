"""The embedded backend's engine: one base model, LoRA adapters loaded by name, batched generation.

Requests that share sampling settings run as one `generate` call even when they use different adapters
(PEFT's `adapter_names` routes each row through its own LoRA). Each row stops on its own (EOS, stop
sequence, its own max_new_tokens); tokens are streamed to the request as they are produced.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .adapters import AdapterStore
from .errors import Overloaded, ServeError
from .params import Sampling

log = logging.getLogger("soppu_hub.serve")
GATHER_S = 0.005  # when idle, how long a first request waits for company before its prefill


@dataclass
class TokenEvent:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass
class Job:
    """One generation request as the worker sees it; `emit` delivers events to the request's consumer."""

    prompt_ids: list[int]
    adapter: str  # PEFT adapter name, or BASE
    max_new_tokens: int
    sampling: Sampling
    stop: list[str]
    ignore_eos: bool
    emit: Callable[[str, object], None]  # ("token", TokenEvent) | ("done", dict) | ("error", ServeError)
    release: Callable[[], None] = lambda: None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False  # no more tokens for this row
    finish_reason: str = "length"
    cancelled: bool = False  # set from the request's side when its client went away
    closed: bool = False  # "done" or "error" delivered and the slot released

    def cancel(self) -> None:
        """Stop at the next decoding step (or before starting), so an abandoned request frees its slot now."""
        self.cancelled = True


class _Row:
    """One request in the running batch: its job, its sampler, the token to feed next."""

    def __init__(self, job: Job) -> None:
        from transformers import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
            TypicalLogitsWarper,
        )

        self.job, sp = job, job.sampling
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
        self.next_id: int | None = None

    @property
    def plain_greedy(self) -> bool:
        return self.generator is None and not self.procs

    def pick(self, logits: torch.Tensor) -> tuple[int, float]:
        """(token id, its log-probability under the processed distribution) from this row's last logits."""
        history = torch.tensor([self.job.prompt_ids + self.job.tokens])
        scores = self.procs(history, logits[None].float())[0] if self.procs else logits.float()
        logprobs = torch.log_softmax(scores, dim=-1)
        if self.generator is None:
            tid = int(scores.argmax())
        else:
            tid = int(torch.multinomial(logprobs.exp(), 1, generator=self.generator))
        return tid, float(logprobs[tid])


class Engine:
    """Owns the model. `submit` is thread-safe; one worker thread runs the batches."""

    def __init__(self, model_dir: Path, model_id: str, *, max_adapters: int = 8, max_batch: int = 16,
                 max_total_tokens: int | None = None, max_queue: int = 128, local_root: Path | None = None,
                 device: str = "cpu", share_bases: bool = True) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_id = model_id
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.tokenizer.padding_side = "left"
        self.device = torch.device(device)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(self.device).eval()
        limit = getattr(base.config, "max_position_embeddings", 2048)
        self.max_total_tokens = min(max_total_tokens or limit, limit)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.lock = threading.RLock()  # guards the model: generation and adapter (un)loading
        self.adapters = AdapterStore(base, model_dir, model_id=model_id, lock=self.lock, max_adapters=max_adapters,
                                     local_root=local_root, share_bases=share_bases)
        self.pending: queue.Queue[Job] = queue.Queue()
        self.active = 0  # admitted requests not yet closed
        self.cancelled = 0  # requests stopped early because their client went away
        self._count_lock = threading.Lock()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = base.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None} | ({self.tokenizer.eos_token_id} - {None})
        self.special_ids = set(self.tokenizer.all_special_ids)
        self.worker = threading.Thread(target=self._run, name="soppu-engine", daemon=True)
        self.worker.start()

    # --- admission -------------------------------------------------------------------------------
    def admit(self) -> Callable[[], None]:
        """Reserve a slot or refuse with 429; returns the release function."""
        with self._count_lock:
            if self.active >= self.max_queue:
                raise Overloaded(f"Model is overloaded: {self.active} requests in flight (limit {self.max_queue})")
            self.active += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._count_lock:
                if not released:
                    released = True
                    self.active -= 1

        return release

    def submit(self, job: Job) -> None:
        self.pending.put(job)

    # --- worker: continuous batching ----------------------------------------------------------------
    def _run(self) -> None:
        """One decoding step at a time over the running rows; new requests join at the next step (their prompts
        prefilled, their caches merged in) and finished rows leave at once, so a short request never waits for
        a long one."""
        batch = _Batch()
        while True:
            joining: list[Job] = []
            try:
                joining = self._take(block=not batch.rows, room=self.max_batch - len(batch.rows))
                with self.lock:
                    if joining:
                        self._join(batch, joining)
                    if batch.rows:
                        self._step(batch)
            except Exception as e:  # never let one batch kill the server
                log.exception("generation failed")
                for j in {id(j): j for j in [row.job for row in batch.rows] + joining}.values():
                    if not j.closed:
                        j.done = j.closed = True
                        j.emit("error", ServeError(f"generation failed: {type(e).__name__}: {e}"))
                        j.release()
                batch = _Batch()

    def _take(self, *, block: bool, room: int) -> list[Job]:
        """Queued jobs that fit (waiting for one when nothing runs); abandoned ones are closed unseen."""
        jobs = []
        if block:  # idle: the first request, then whatever arrives with it (a burst prefills as one batch)
            jobs.append(self.pending.get())
        while len(jobs) < room:
            try:
                jobs.append(self.pending.get(timeout=GATHER_S) if block else self.pending.get_nowait())
            except queue.Empty:
                break
        for j in [j for j in jobs if j.cancelled]:
            j.done, j.finish_reason = True, "cancelled"
            self._close(j, None)
        return [j for j in jobs if not j.closed]

    def _forward(self, names: list[str], **inputs) -> torch.Tensor:
        from .multilora import rows_use

        model, adapter_names = self.adapters.model_for(names)
        if adapter_names is not None and not getattr(model, "_soppu_rows_ok", False):  # embedding LoRA, heads
            return model(**inputs, use_cache=True, adapter_names=adapter_names).logits[:, -1]
        with rows_use(adapter_names):  # not PEFT's adapter_names: it would hook every layer on every step
            return model(**inputs, use_cache=True).logits[:, -1]

    @torch.no_grad()
    def _join(self, batch: "_Batch", jobs: list[Job]) -> None:
        """Prefill the newcomers together (left-padded), give each its first token, merge their cache in."""
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, j in enumerate(jobs):
            ids[r, width - len(j.prompt_ids):] = torch.tensor(j.prompt_ids)
            mask[r, width - len(j.prompt_ids):] = 1
        from transformers import DynamicCache

        cache = DynamicCache()
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        logits = self._forward([j.adapter for j in jobs], input_ids=ids.to(self.device),
                               attention_mask=mask.to(self.device), position_ids=positions.to(self.device),
                               past_key_values=cache)
        rows = [_Row(j) for j in jobs]
        batch.merge(rows, cache, mask)
        for row, picked in zip(rows, _pick_all(rows, logits)):
            self._emit(row, *picked)
        batch.drop_finished()

    @torch.no_grad()
    def _step(self, batch: "_Batch") -> None:
        """Feed every row its last token, pick the next one, let finished rows go."""
        ids = torch.tensor([[row.next_id] for row in batch.rows])
        positions = batch.mask.sum(1, keepdim=True)
        batch.mask = torch.cat([batch.mask, torch.ones(len(batch.rows), 1, dtype=batch.mask.dtype)], 1)
        logits = self._forward([row.job.adapter for row in batch.rows], input_ids=ids.to(self.device),
                               attention_mask=batch.mask.to(self.device), position_ids=positions.to(self.device),
                               past_key_values=batch.cache)
        for row, picked in zip(batch.rows, _pick_all(batch.rows, logits)):
            if row.job.cancelled:
                row.job.done, row.job.finish_reason = True, "cancelled"
                self._close(row.job, row.seed)
                continue
            self._emit(row, *picked)
        batch.drop_finished()

    def _emit(self, row: _Row, tid: int, logprob: float) -> None:
        """Record the row's token, stream it, and close the row when it is finished."""
        job = row.job
        special = tid in self.special_ids
        job.tokens.append(tid)
        text = ""
        if not special:
            full = self.tokenizer.decode([t for t in job.tokens if t not in self.special_ids], skip_special_tokens=True)
            if not full.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                text, job.text = full[len(job.text):], full
        if tid in self.eos_ids and not job.ignore_eos:
            job.done, job.finish_reason = True, "eos_token"
        elif any(s and job.text.endswith(s) for s in job.stop):
            job.done, job.finish_reason = True, "stop_sequence"
        elif len(job.tokens) >= job.max_new_tokens:
            job.done, job.finish_reason = True, "length"
        job.emit("token", TokenEvent(tid, text if not special else self.tokenizer.convert_ids_to_tokens(tid), logprob, special))
        row.next_id = tid
        if job.done:  # this row's slot is free now, whatever the rest of the batch still does
            self._close(job, row.seed)

    def _close(self, job: Job, seed: int | None) -> None:
        """Deliver the row's "done" event and release its slot, once."""
        if job.closed:
            return
        job.closed = True
        if job.finish_reason == "cancelled":
            with self._count_lock:
                self.cancelled += 1
        job.emit("done", {"finish_reason": job.finish_reason, "prompt_tokens": len(job.prompt_ids),
                          "generated_tokens": len(job.tokens), "seed": seed})
        job.release()


def _pick_all(rows: list[_Row], logits: torch.Tensor) -> list[tuple[int, float]]:
    """Every row's next token: plain greedy rows in one vectorised argmax, the others through their sampler."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best = logprobs.argmax(-1).tolist()
    return [(best[r], float(logprobs[r, best[r]])) if row.plain_greedy else row.pick(logits[r])
            for r, row in enumerate(rows)]


class _Batch:
    """The running rows, their shared KV cache (left-padded) and attention mask."""

    def __init__(self) -> None:
        self.rows: list[_Row] = []
        self.cache = None  # transformers DynamicCache
        self.mask = torch.zeros(0, 0, dtype=torch.long)

    def merge(self, rows: list[_Row], cache, mask: torch.Tensor) -> None:
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
        keep = [i for i, row in enumerate(self.rows) if not row.job.closed]
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
