"""The embedded backend's engine: one base model, adapters by name, a continuous-batching decoding loop.

Its own loop, not `generate`: one decoding step at a time over the running rows and one left-padded KV cache
(batch.py); a request joins at the next step (its prompt prefilled, its cache merged in) and leaves as soon as
it finishes (EOS, a stop sequence, its max_new_tokens, or its client gone), so a short request never waits for
a long one. Rows with different adapters share every forward (peft_patch.py); tokens stream out as produced.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..evaluate.replies import pad_id
from .adapters import AdapterStore
from .batch import Batch, Sampler, pick_all
from .config import ServeConfig
from .errors import Overloaded, ServeError
from .params import GenerateRequest

log = logging.getLogger("soppu_hub.serve")
GATHER_S = 0.005  # when idle, how long a first request waits for company before its prefill


@dataclass
class TokenEvent:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass
class Generation:
    """One request as the engine runs it (a row of the batch once it joins); `emit` delivers its events."""

    request: GenerateRequest
    adapter: str  # PEFT adapter name, or BASE
    emit: Callable[[str, object], None]  # ("token", TokenEvent) | ("done", dict) | ("error", ServeError)
    release: Callable[[], None] = lambda: None
    sampler: Sampler | None = None  # made when it joins the batch
    next_id: int | None = None  # the token to feed at the next step
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False  # no more tokens for this row
    finish_reason: str = "length"
    cancelled: bool = False  # set from the request's side when its client went away
    closed: bool = False  # "done" or "error" delivered and the slot released

    def cancel(self) -> None:
        """Stop at the next decoding step (or before starting), so an abandoned request frees its slot now."""
        self.cancelled = True


class Engine:
    """Owns the model. `submit` is thread-safe; one worker thread runs the batches."""

    def __init__(self, model_dir: Path, config: ServeConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_id = config.model or str(model_dir)
        self.admin_token = config.admin_token
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.tokenizer.padding_side = "left"
        self.device = torch.device(config.device)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(self.device).eval()
        limit = getattr(base.config, "max_position_embeddings", 2048)
        self.max_total_tokens = min(config.max_total_tokens or limit, limit)
        self.max_batch, self.max_concurrent_requests = config.max_batch, config.max_concurrent_requests
        self.lock = threading.RLock()  # guards the model: generation and adapter (un)loading
        self.adapters = AdapterStore(
            base,
            model_dir,
            model_id=self.model_id,
            lock=self.lock,
            max_adapters=config.max_adapters,
            local_root=Path(config.adapter_dir) if config.adapter_dir else None,
            share_bases=config.share_bases,
            max_lora_bytes=config.max_lora_bytes,
        )
        self.pending: queue.Queue[Generation] = queue.Queue()
        self.active = 0  # admitted requests not yet closed
        self.cancelled = 0  # requests stopped early because their client went away
        self._count_lock = threading.Lock()
        self.pad_id = pad_id(self.tokenizer)
        eos = base.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None} | ({self.tokenizer.eos_token_id} - {None})
        self.special_ids = set(self.tokenizer.all_special_ids)
        # transformers builds a decoding step's mask from the 2D padding mask with vmap, slower than the step itself
        # once rows of different lengths share a batch; for SDPA with full attention we hand it the 4D mask instead
        cfg = base.config
        self.padding_mask_is_enough = (
            getattr(cfg, "_attn_implementation", None) == "sdpa"
            and (getattr(cfg, "sliding_window", None) is None or getattr(cfg, "use_sliding_window", True) is False)
            and "sliding_attention" not in (getattr(cfg, "layer_types", None) or [])
        )
        self.worker = threading.Thread(target=self._run, name="soppu-engine", daemon=True)
        self.worker.start()

    # --- admission -------------------------------------------------------------------------------
    def admit(self) -> Callable[[], None]:
        """Reserve a slot or refuse with 429; returns the release function."""
        with self._count_lock:
            if self.active >= self.max_concurrent_requests:
                raise Overloaded(
                    f"Model is overloaded: {self.active} requests in flight (limit {self.max_concurrent_requests})"
                )
            self.active += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._count_lock:
                if not released:
                    released = True
                    self.active -= 1

        return release

    def submit(self, gen: Generation) -> None:
        self.pending.put(gen)

    # --- worker: continuous batching ----------------------------------------------------------------
    def _run(self) -> None:
        """One decoding step at a time over the running rows; new requests join at the next step (their prompts
        prefilled, their caches merged in) and finished rows leave at once, so a short request never waits for
        a long one."""
        batch = Batch()
        while True:
            joining: list[Generation] = []
            try:
                joining = self._take(block=not batch.rows, room=self.max_batch - len(batch.rows))
                with self.lock:
                    if joining:
                        self._join(batch, joining)
                    if batch.rows:
                        self._step(batch)
            except Exception as e:  # never let one batch kill the server
                log.exception("generation failed")
                for g in {id(g): g for g in batch.rows + joining}.values():
                    if not g.closed:
                        g.done = g.closed = True
                        g.emit("error", ServeError(f"generation failed: {type(e).__name__}: {e}"))
                        g.release()
                batch = Batch()

    def _take(self, *, block: bool, room: int) -> list[Generation]:
        """Queued generations that fit (waiting for one when nothing runs); abandoned ones are closed unseen."""
        gens = []
        if block:  # idle: the first request, then whatever arrives with it (a burst prefills as one batch)
            gens.append(self.pending.get())
        while len(gens) < room:
            try:
                gens.append(self.pending.get(timeout=GATHER_S) if block else self.pending.get_nowait())
            except queue.Empty:
                break
        for g in [g for g in gens if g.cancelled]:
            g.done, g.finish_reason = True, "cancelled"
            self._close(g)
        return [g for g in gens if not g.closed]

    def _forward(self, names: list[str], **inputs) -> torch.Tensor:
        from .peft_patch import rows_use

        model, adapter_names = self.adapters.model_for(names)
        if adapter_names is not None and not getattr(model, "_soppu_rows_ok", False):  # embedding LoRA, heads
            return model(**inputs, use_cache=True, adapter_names=adapter_names).logits[:, -1]
        with rows_use(adapter_names):  # not PEFT's adapter_names: it would hook every layer on every step
            return model(**inputs, use_cache=True).logits[:, -1]

    @torch.no_grad()
    def _join(self, batch: Batch, gens: list[Generation]) -> None:
        """Prefill the newcomers together (left-padded), give each its first token, merge their cache in."""
        width = max(len(g.request.ids) for g in gens)
        ids = torch.full((len(gens), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, g in enumerate(gens):
            ids[r, width - len(g.request.ids) :] = torch.tensor(g.request.ids)
            mask[r, width - len(g.request.ids) :] = 1
        from transformers import DynamicCache

        cache = DynamicCache()
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        logits = self._forward(
            [g.adapter for g in gens],
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=cache,
        )
        for g in gens:
            g.sampler = Sampler(g.request.sampling, g.request.ids)
        batch.merge(gens, cache, mask)
        for g, picked in zip(gens, pick_all(gens, logits)):
            self._emit(g, *picked)
        batch.drop_finished()

    @torch.no_grad()
    def _step(self, batch: Batch) -> None:
        """Feed every row its last token, pick the next one, let finished rows go."""
        ids = torch.tensor([[row.next_id] for row in batch.rows])
        positions = batch.mask.sum(1, keepdim=True)
        batch.mask = torch.cat([batch.mask, torch.ones(len(batch.rows), 1, dtype=batch.mask.dtype)], 1)
        mask = batch.mask.to(self.device)
        if self.padding_mask_is_enough:  # one new token per row: the padding mask is the whole 4D mask
            mask = mask.bool()[:, None, None, :]
        logits = self._forward(
            [row.adapter for row in batch.rows],
            input_ids=ids.to(self.device),
            attention_mask=mask,
            position_ids=positions.to(self.device),
            past_key_values=batch.cache,
        )
        for row, picked in zip(batch.rows, pick_all(batch.rows, logits)):
            if row.cancelled:
                row.done, row.finish_reason = True, "cancelled"
                self._close(row)
                continue
            self._emit(row, *picked)
        batch.drop_finished()

    def _emit(self, gen: Generation, tid: int, logprob: float) -> None:
        """Record the row's token, stream it, and close the row when it is finished."""
        special = tid in self.special_ids
        gen.tokens.append(tid)
        text = ""
        if not special:
            full = self.tokenizer.decode([t for t in gen.tokens if t not in self.special_ids], skip_special_tokens=True)
            if not full.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                text, gen.text = full[len(gen.text) :], full
        if tid in self.eos_ids and not gen.request.ignore_eos:
            gen.done, gen.finish_reason = True, "eos_token"
        elif any(s and gen.text.endswith(s) for s in gen.request.stop):
            gen.done, gen.finish_reason = True, "stop_sequence"
        elif len(gen.tokens) >= gen.request.max_new:
            gen.done, gen.finish_reason = True, "length"
        gen.emit(
            "token",
            TokenEvent(tid, text if not special else self.tokenizer.convert_ids_to_tokens(tid), logprob, special),
        )
        gen.next_id = tid
        if gen.done:  # this row's slot is free now, whatever the rest of the batch still does
            self._close(gen)

    def _close(self, gen: Generation) -> None:
        """Deliver the row's "done" event and release its slot, once."""
        if gen.closed:
            return
        gen.closed = True
        if gen.finish_reason == "cancelled":
            with self._count_lock:
                self.cancelled += 1
        gen.emit(
            "done",
            {
                "finish_reason": gen.finish_reason,
                "prompt_tokens": len(gen.request.ids),
                "generated_tokens": len(gen.tokens),
                "seed": gen.sampler.seed if gen.sampler else None,
            },
        )
        gen.release()
