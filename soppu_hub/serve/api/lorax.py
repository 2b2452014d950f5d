"""LoRAX's REST API over the engine, close enough that `lorax-client` works unchanged.

Wire format as LoRAX's router has it: `POST /` answers a JSON list of one GenerateResponse, or SSE
`data:{json}` lines when `stream` is true; errors are `{"error", "error_type"}` (422 validation, 424
generation, 429 overloaded), inside the stream as a `data:` event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ... import __version__
from ..engine import Engine, TokenEvent
from ..errors import Forbidden, ValidationFailed
from ..params import MAX_STOP_SEQUENCES
from .submission import Submission, body_of, collect, sse, submit, token_json

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def check_admin(engine: Engine, request: Request) -> None:
    """A route that changes what is served: with --admin-token, only 'Authorization: Bearer <it>'; without one,
    only a client on this machine (a server on 0.0.0.0 is not reloaded by strangers)."""
    import hmac

    if engine.admin_token:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), engine.admin_token.encode()):
            raise Forbidden(
                "this route changes what the server serves: send 'Authorization: Bearer <the --admin-token the "
                "server was started with>'"
            )
    elif (request.client.host if request.client else "") not in LOOPBACK:
        raise Forbidden(
            "this route changes what the server serves and answers this machine only; start the server with "
            "--admin-token TOKEN to allow it from elsewhere"
        )


async def _stream(req: Submission) -> AsyncIterator[bytes]:
    text = []
    last: TokenEvent | None = None
    async for kind, payload in req.events_until_done():
        if kind == "error":
            if last is not None:  # what was generated before the failure still reaches the client
                yield sse({"token": token_json(last), "generated_text": None, "details": None})
            yield sse({"error": str(payload), "error_type": payload.error_type})
            return
        if kind == "token":
            if last is not None:
                yield sse({"token": token_json(last), "generated_text": None, "details": None})
            last = payload
            if not payload.special:
                text.append(payload.text)
        else:
            full = "".join(text)
            if req.params.get("return_full_text"):
                full = req.inputs + full
            details = {**payload, "skipped_tokens": 0}
            token = (
                token_json(last) if last else {"id": 0, "text": "", "logprob": 0.0, "special": True, "skipped": True}
            )
            yield sse({"token": token, "generated_text": full, "details": details})


def lorax_routes(engine: Engine) -> APIRouter:
    router = APIRouter()

    async def generate(request: Request, body: dict, stream: bool):
        req = await submit(engine, body)
        if stream:
            return StreamingResponse(_stream(req), media_type="text/event-stream")
        return await req.collect_while_connected(request, collect)

    @router.post("/")
    async def compat(request: Request):
        body = await body_of(request)
        if body.get("stream"):
            return await generate(request, body, True)
        return [await generate(request, body, False)]

    @router.post("/generate")
    async def generate_route(request: Request):
        return await generate(request, await body_of(request), False)

    @router.post("/generate_stream")
    async def generate_stream_route(request: Request):
        return await generate(request, await body_of(request), True)

    @router.get("/health")
    async def health():
        return {}

    @router.get("/info")
    async def info():
        return {
            "model_id": engine.model_id,
            "model_sha": None,
            "model_dtype": "torch.float32",
            "model_device_type": engine.device.type,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": engine.max_concurrent_requests,
            "max_best_of": 1,
            "max_stop_sequences": MAX_STOP_SEQUENCES,
            "max_input_length": engine.max_total_tokens - 1,
            "max_total_tokens": engine.max_total_tokens,
            "max_batch_size": engine.max_batch,
            "version": f"soppu-hub {__version__}",
            "sha": None,
            "docker_label": None,
            "request_logger_url": None,
            "eager_prefill": False,
            "preloaded_adapters": list(engine.adapters.preloaded),
            "loaded_adapters": engine.adapters.loaded_ids(),
            **engine.adapters.memory(),
            "requests_in_flight": engine.active,
            "requests_cancelled": engine.cancelled,
            "chat_template": getattr(engine.tokenizer, "chat_template", None),
            "admin_routes": "token" if engine.admin_token else "loopback only",
        }

    @router.post("/collection/reload")
    def reload_collection(request: Request):
        """Not LoRAX's: read the resident collection's newest revision (members that joined since start); a
        damaged one is refused in one line and the server keeps serving what it had. An admin route."""
        check_admin(engine, request)
        return engine.adapters.reload_collection()

    @router.post("/tokenize")
    async def tokenize(request: Request):
        body = await body_of(request)
        if not isinstance(body.get("inputs"), str):
            raise ValidationFailed("`inputs` must be a string")
        enc = engine.tokenizer(body["inputs"], return_offsets_mapping=True)
        return [
            {"id": i, "text": body["inputs"][s:t], "start": s, "stop": t}
            for i, (s, t) in zip(enc.input_ids, enc.offset_mapping)
        ]

    return router
