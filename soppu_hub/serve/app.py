"""LoRAX's REST API over the engine, close enough that `lorax-client` works unchanged.

Wire format as LoRAX's router has it: `POST /` answers a JSON list of one GenerateResponse, or SSE
`data:{json}` lines when `stream` is true; errors are `{"error", "error_type"}` (422 validation, 424
generation, 429 overloaded), inside the stream as a `data:` event.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .. import __version__
from .engine import Engine, Job, TokenEvent
from .errors import ServeError, ValidationFailed
from .params import MAX_STOP_SEQUENCES, parse_generate


def _err(e: ServeError) -> JSONResponse:
    return JSONResponse({"error": str(e), "error_type": e.error_type}, status_code=e.status)


def _openai_error(e: ServeError) -> dict:
    return {"error": {"message": str(e), "type": e.error_type, "code": e.status, "param": None}}


def _sse(obj: Any) -> bytes:
    return f"data:{json.dumps(obj)}\n\n".encode()


def _token_json(t: TokenEvent) -> dict:
    return {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special, "skipped": False}


class _Request:
    """A validated generation request bound to an asyncio queue of engine events."""

    def __init__(self, engine: Engine, inputs: str, params: dict, loop: asyncio.AbstractEventLoop):
        self.engine, self.inputs, self.params, self.loop = engine, inputs, params, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.job: Job | None = None
        self.finished = False

    def start(self) -> None:
        """Validate, admit, load the adapter (may take a while: in a thread), then queue the job."""
        e = self.engine
        r = parse_generate(self.inputs, self.params, max_total_tokens=e.max_total_tokens,
                           tokenize=lambda text: e.tokenizer(text, add_special_tokens=True).input_ids)
        ids, max_new, sampling, stop = r.ids, r.max_new, r.sampling, r.stop
        release = self.engine.admit()
        try:
            name, unpin = self.engine.adapters.acquire(self.params.get("adapter_id"), self.params.get("adapter_source"),
                                                      self.params.get("api_token"))
        except BaseException:
            release()
            raise

        def emit(kind: str, payload: object) -> None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

        def done() -> None:
            unpin()
            release()

        self.prompt_len = len(ids)
        self.job = Job(ids, name, max_new, sampling, stop, bool(self.params.get("ignore_eos_token")), emit, done)
        self.engine.submit(self.job)

    def cancel(self) -> None:
        if self.job is not None and not self.finished:
            self.job.cancel()

    async def events_until_done(self) -> AsyncIterator[tuple[str, object]]:
        """The engine's events; a consumer that stops listening (client gone, task cancelled) cancels the job."""
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
        """Run `collect(self)`; if the client hangs up first, cancel the job so its slot is freed at once."""
        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.cancel()

        watcher = asyncio.create_task(watch())
        try:
            return await collect(self)
        finally:
            watcher.cancel()


async def _begin(engine: Engine, body: dict) -> _Request:
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise ValidationFailed("`parameters` must be a JSON object")
    for name in ("adapter_id", "adapter_source", "api_token"):
        if params.get(name) is not None and not isinstance(params[name], str):
            raise ValidationFailed(f"`{name}` must be a string")
    req = _Request(engine, body.get("inputs"), dict(params), asyncio.get_running_loop())
    await run_in_threadpool(req.start)
    return req


async def _collect(req: _Request) -> dict:
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
        out["details"] = {**details, "skipped_tokens": 0, "prefill": [], "tokens": [_token_json(t) for t in tokens],
                          "best_of_sequences": None}
    return out


async def _stream(req: _Request) -> AsyncIterator[bytes]:
    text = []
    last: TokenEvent | None = None
    async for kind, payload in req.events_until_done():
        if kind == "error":
            if last is not None:  # what was generated before the failure still reaches the client
                yield _sse({"token": _token_json(last), "generated_text": None, "details": None})
            yield _sse({"error": str(payload), "error_type": payload.error_type})
            return
        if kind == "token":
            if last is not None:
                yield _sse({"token": _token_json(last), "generated_text": None, "details": None})
            last = payload
            if not payload.special:
                text.append(payload.text)
        else:
            full = "".join(text)
            if req.params.get("return_full_text"):
                full = req.inputs + full
            details = {**payload, "skipped_tokens": 0}
            token = _token_json(last) if last else {"id": 0, "text": "", "logprob": 0.0, "special": True, "skipped": True}
            yield _sse({"token": token, "generated_text": full, "details": details})


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="soppu-hub embedded LoRAX-compatible backend", docs_url=None, redoc_url=None)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, e: ServeError):
        if request.url.path.startswith("/v1/"):  # OpenAI clients read {"error": {"message", "type", "code"}}
            return JSONResponse(_openai_error(e), status_code=e.status)
        return _err(e)

    @app.get("/v1/models")
    async def models():
        """The base model, then the adapters loaded now (each with the base as parent), as vLLM lists LoRA modules."""
        created = int(time.time())
        base = {"id": engine.model_id, "object": "model", "created": created, "owned_by": "soppu-hub", "root": engine.model_id,
                "parent": None}
        loaded = [{"id": adapter_id, "object": "model", "created": created, "owned_by": "soppu-hub", "root": adapter_id,
                   "parent": engine.model_id}
                  for source, adapter_id in (i.split(":", 1) for i in engine.adapters.loaded_ids()) if source == "hub"]
        return {"object": "list", "data": [base, *loaded]}

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8 at all
            raise ValidationFailed("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ValidationFailed("request body must be a JSON object")
        return body

    async def generate(request: Request, body: dict, stream: bool):
        req = await _begin(engine, body)
        if stream:
            return StreamingResponse(_stream(req), media_type="text/event-stream")
        return await req.collect_while_connected(request, _collect)

    @app.post("/")
    async def compat(request: Request):
        body = await body_of(request)
        if body.get("stream"):
            return await generate(request, body, True)
        return [await generate(request, body, False)]

    @app.post("/generate")
    async def generate_route(request: Request):
        return await generate(request, await body_of(request), False)

    @app.post("/generate_stream")
    async def generate_stream_route(request: Request):
        return await generate(request, await body_of(request), True)

    @app.get("/health")
    async def health():
        return {}

    @app.get("/info")
    async def info():
        return {
            "model_id": engine.model_id, "model_sha": None, "model_dtype": "torch.float32",
            "model_device_type": engine.device.type, "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": engine.max_queue, "max_best_of": 1, "max_stop_sequences": MAX_STOP_SEQUENCES,
            "max_input_length": engine.max_total_tokens - 1, "max_total_tokens": engine.max_total_tokens,
            "max_batch_size": engine.max_batch, "version": f"soppu-hub {__version__}", "sha": None, "docker_label": None,
            "request_logger_url": None, "eager_prefill": False, "preloaded_adapters": [],
            "loaded_adapters": engine.adapters.loaded_ids(), **engine.adapters.memory(),
            "requests_in_flight": engine.active, "requests_cancelled": engine.cancelled,
            "chat_template": getattr(engine.tokenizer, "chat_template", None),
        }

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await body_of(request)
        if not isinstance(body.get("inputs"), str):
            raise ValidationFailed("`inputs` must be a string")
        enc = engine.tokenizer(body["inputs"], return_offsets_mapping=True)
        return [{"id": i, "text": body["inputs"][s:t], "start": s, "stop": t}
                for i, (s, t) in zip(enc.input_ids, enc.offset_mapping)]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValidationFailed("`messages` must be a non-empty list")
        try:
            prompt = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:
            raise ValidationFailed(f"messages cannot be rendered with the chat template: {e}") from None
        model = body.get("model") or ""
        params = {"adapter_id": None if model in ("", engine.model_id) else model, "adapter_source": body.get("adapter_source"),
                  "max_new_tokens": body.get("max_tokens"), "temperature": body.get("temperature"), "top_p": body.get("top_p"),
                  "seed": body.get("seed"), "stop": [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop"),
                  "api_token": request.headers.get("authorization", "")[7:] or None, "details": True}
        req = await _begin(engine, {"inputs": prompt, "parameters": params})
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())

        def finish(reason: str) -> str:
            return "length" if reason == "length" else "stop"

        if body.get("stream"):
            async def chunks():
                async for kind, payload in req.events_until_done():
                    if kind == "error":
                        yield _sse(_openai_error(payload))
                        return
                    delta, reason = ({"content": payload.text} if not payload.special else {}, None) if kind == "token" \
                        else ({}, finish(payload["finish_reason"]))
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                "choices": [{"index": 0, "delta": {"role": "assistant", **delta}, "finish_reason": reason}]})
                yield b"data: [DONE]\n\n"

            return StreamingResponse(chunks(), media_type="text/event-stream")
        out = await req.collect_while_connected(request, _collect)
        d = out["details"]
        return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["generated_text"]},
                             "finish_reason": finish(d["finish_reason"])}],
                "usage": {"prompt_tokens": d["prompt_tokens"], "completion_tokens": d["generated_tokens"],
                          "total_tokens": d["prompt_tokens"] + d["generated_tokens"]}}

    return app
