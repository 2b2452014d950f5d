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
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .adapters import AdapterStore
from .errors import Overloaded, ServeError
from .params import Sampling

log = logging.getLogger("soppu_hub.serve")


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


class _Capture:
    """Logits processor that keeps the step's log-probabilities so each token can carry its logprob."""

    def __init__(self) -> None:
        self.logprobs: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        self.logprobs = torch.log_softmax(scores.float(), dim=-1)
        return scores


class _Rows:
    """Streamer + stopping criteria for a batch: per-row bookkeeping of tokens, text and stop reasons."""

    def __init__(self, jobs: list[Job], tokenizer, capture: _Capture, eos_ids: set[int], special_ids: set[int],
                 close: Callable[[Job], None]):
        self.jobs, self.tok, self.capture = jobs, tokenizer, capture
        self.eos_ids, self.special_ids, self.close = eos_ids, special_ids, close
        self.first = True

    # streamer protocol
    def put(self, value: torch.Tensor) -> None:
        if self.first:  # the prompt
            self.first = False
            return
        lp = self.capture.logprobs
        for row, job in enumerate(self.jobs):
            if job.done:
                continue
            if job.cancelled:
                job.done, job.finish_reason = True, "cancelled"
                self.close(job)
                continue
            tid = int(value[row])
            special = tid in self.special_ids
            job.tokens.append(tid)
            text = ""
            if not special:
                full = self.tok.decode([t for t in job.tokens if t not in self.special_ids], skip_special_tokens=True)
                if not full.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    text, job.text = full[len(job.text):], full
            logprob = float(lp[row, tid]) if lp is not None else 0.0
            if tid in self.eos_ids and not job.ignore_eos:
                job.done, job.finish_reason = True, "eos_token"
            elif any(s and job.text.endswith(s) for s in job.stop):
                job.done, job.finish_reason = True, "stop_sequence"
            elif len(job.tokens) >= job.max_new_tokens:
                job.done, job.finish_reason = True, "length"
            job.emit("token", TokenEvent(tid, text if not special else self.tok.convert_ids_to_tokens(tid), logprob, special))
            if job.done:  # this row's slot is free now, whatever the rest of the batch still does
                self.close(job)

    def end(self) -> None:
        pass

    # stopping-criteria protocol: a per-row mask
    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([j.done or j.cancelled for j in self.jobs], dtype=torch.bool, device=input_ids.device)


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

    # --- worker ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            jobs = [self.pending.get()]
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self.pending.get(timeout=0.005))
                except queue.Empty:
                    break
            for j in [j for j in jobs if j.cancelled]:  # abandoned while queued: never decoded
                j.done, j.finish_reason = True, "cancelled"
                self._close(j, None)
            jobs = [j for j in jobs if not j.closed]
            if not jobs:
                continue
            groups: OrderedDict[Sampling, list[Job]] = OrderedDict()
            for j in jobs:
                groups.setdefault(j.sampling, []).append(j)
            for sampling, group in groups.items():
                try:
                    self._generate(group, sampling)
                except Exception as e:  # never let one batch kill the server
                    log.exception("generation failed")
                    for j in group:
                        if not j.closed:
                            j.done = j.closed = True
                            j.emit("error", ServeError(f"generation failed: {type(e).__name__}: {e}"))
                            j.release()

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

    @torch.no_grad()
    def _generate(self, jobs: list[Job], sampling: Sampling) -> None:
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, j in enumerate(jobs):
            ids[row, width - len(j.prompt_ids):] = torch.tensor(j.prompt_ids)
            mask[row, width - len(j.prompt_ids):] = 1
        capture = _Capture()
        kwargs = sampling.generate_kwargs()
        seed = sampling.seed
        if sampling.do_sample:
            seed = seed if seed is not None else random.randrange(2**31)
            torch.manual_seed(seed)
        shown_seed = seed if sampling.do_sample else None
        rows = _Rows(jobs, self.tokenizer, capture, self.eos_ids, self.special_ids, lambda j: self._close(j, shown_seed))
        with self.lock:
            model, names = self.adapters.model_for([j.adapter for j in jobs])
            extra = {"adapter_names": names} if names is not None else {}
            model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=max(j.max_new_tokens for j in jobs), min_new_tokens=0,
                eos_token_id=None, pad_token_id=self.pad_id, streamer=rows, stopping_criteria=[rows],
                logits_processor=[capture], **kwargs, **extra,
            )
        for j in jobs:
            if j.cancelled and not j.closed:
                j.finish_reason = "cancelled"
            j.done = True
            self._close(j, shown_seed)
