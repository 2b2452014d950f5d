"""OpenAI's /v1 API over the engine, as vLLM serves LoRA adapters: the adapter id is the model name."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..engine import Engine
from ..errors import ServeError, ValidationFailed
from .submission import body_of, collect, sse, submit


def openai_error(e: ServeError) -> dict:
    """OpenAI clients read {"error": {"message", "type", "code"}}."""
    return {"error": {"message": str(e), "type": e.error_type, "code": e.status, "param": None}}


def openai_routes(engine: Engine) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def models():
        """The base model, then the adapters loaded now (each with the base as parent), as vLLM lists LoRA modules."""
        created = int(time.time())
        base = {
            "id": engine.model_id,
            "object": "model",
            "created": created,
            "owned_by": "soppu-hub",
            "root": engine.model_id,
            "parent": None,
        }
        loaded = [
            {
                "id": adapter_id,
                "object": "model",
                "created": created,
                "owned_by": "soppu-hub",
                "root": adapter_id,
                "parent": engine.model_id,
            }
            for source, adapter_id in (i.split(":", 1) for i in engine.adapters.loaded_ids())
            if source == "hub"
        ]
        return {"object": "list", "data": [base, *loaded]}

    @router.post("/chat/completions")
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
        params = {
            "adapter_id": None if model in ("", engine.model_id) else model,
            "adapter_source": body.get("adapter_source"),
            "max_new_tokens": body.get("max_tokens"),
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "seed": body.get("seed"),
            "stop": [body["stop"]] if isinstance(body.get("stop"), str) else body.get("stop"),
            "api_token": request.headers.get("authorization", "")[7:] or None,
            "details": True,
        }
        req = await submit(engine, {"inputs": prompt, "parameters": params})
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())

        def finish(reason: str) -> str:
            return "length" if reason == "length" else "stop"

        if body.get("stream"):

            async def chunks():
                async for kind, payload in req.events_until_done():
                    if kind == "error":
                        yield sse(openai_error(payload))
                        return
                    delta, reason = (
                        ({"content": payload.text} if not payload.special else {}, None)
                        if kind == "token"
                        else ({}, finish(payload["finish_reason"]))
                    )
                    yield sse(
                        {
                            "id": cid,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": model,
                            "choices": [{"index": 0, "delta": {"role": "assistant", **delta}, "finish_reason": reason}],
                        }
                    )
                yield b"data: [DONE]\n\n"

            return StreamingResponse(chunks(), media_type="text/event-stream")
        out = await req.collect_while_connected(request, collect)
        d = out["details"]
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": out["generated_text"]},
                    "finish_reason": finish(d["finish_reason"]),
                }
            ],
            "usage": {
                "prompt_tokens": d["prompt_tokens"],
                "completion_tokens": d["generated_tokens"],
                "total_tokens": d["prompt_tokens"] + d["generated_tokens"],
            },
        }

    return router
