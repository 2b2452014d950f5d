"""A request submitted to the engine, as both APIs handle it: checked, admitted, its events read back.

Also the wire pieces both APIs share: JSON bodies, SSE lines, LoRAX's token JSON, a whole reply collected.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..engine import Engine, Generation, TokenEvent
from ..errors import ValidationFailed
from ..params import parse_generate


def sse(obj: Any) -> bytes:
    return f"data:{json.dumps(obj)}\n\n".encode()


def token_json(t: TokenEvent) -> dict:
    return {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special, "skipped": False}


async def body_of(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8 at all
        raise ValidationFailed("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ValidationFailed("request body must be a JSON object")
    return body


class Submission:
    """A checked request bound to the asyncio queue its engine events arrive on."""

    def __init__(self, engine: Engine, inputs: str, params: dict, loop: asyncio.AbstractEventLoop):
        self.engine, self.inputs, self.params, self.loop = engine, inputs, params, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.generation: Generation | None = None
        self.finished = False

    def start(self) -> None:
        """Validate, admit, load the adapter (may take a while: in a thread), then queue the job."""
        e = self.engine
        request = parse_generate(
            self.inputs,
            self.params,
            max_total_tokens=e.max_total_tokens,
            tokenize=lambda text: e.tokenizer(text, add_special_tokens=True).input_ids,
        )
        release = self.engine.admit()
        try:
            name, unpin = self.engine.adapters.acquire(
                self.params.get("adapter_id"), self.params.get("adapter_source"), self.params.get("api_token")
            )
        except BaseException:
            release()
            raise

        def emit(kind: str, payload: object) -> None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

        def done() -> None:
            unpin()
            release()

        self.generation = Generation(request, name, emit, done)
        self.engine.submit(self.generation)

    def cancel(self) -> None:
        if self.generation is not None and not self.finished:
            self.generation.cancel()

    async def events_until_done(self) -> AsyncIterator[tuple[str, object]]:
        """The engine's events; a consumer that stops listening (client gone, task cancelled) cancels the generation."""
        try:
            while True:
                kind, payload = await self.events.get()
                if kind in ("done", "error"):
                    self.finished = True
                yield kind, payload
                if self.finished:
                    return
        finally:
            self.cancel()

    async def collect_while_connected(self, request: Request, collect):
        """Run `collect(self)`; if the client hangs up first, cancel the generation so its slot is freed at once."""

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.cancel()

        watcher = asyncio.create_task(watch())
        try:
            return await collect(self)
        finally:
            watcher.cancel()


async def submit(engine: Engine, body: dict) -> Submission:
    """LoRAX's {"inputs", "parameters"} checked, admitted and queued (the adapter loaded first, in a thread)."""
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise ValidationFailed("`parameters` must be a JSON object")
    for name in ("adapter_id", "adapter_source", "api_token"):
        if params.get(name) is not None and not isinstance(params[name], str):
            raise ValidationFailed(f"`{name}` must be a string")
    req = Submission(engine, body.get("inputs"), dict(params), asyncio.get_running_loop())
    await run_in_threadpool(req.start)
    return req


async def collect(req: Submission) -> dict:
    """The whole reply as LoRAX's GenerateResponse (details when asked)."""
    tokens, details = [], None
    async for kind, payload in req.events_until_done():
        if kind == "token":
            tokens.append(payload)
        elif kind == "error":
            raise payload
        else:
            details = payload
    text = "".join(t.text for t in tokens if not t.special)
    if req.params.get("return_full_text"):
        text = req.inputs + text
    out = {"generated_text": text, "details": None}
    if req.params.get("details") or req.params.get("decoder_input_details"):
        out["details"] = {
            **details,
            "skipped_tokens": 0,
            "prefill": [],
            "tokens": [token_json(t) for t in tokens],
            "best_of_sequences": None,
        }
    return out
