"""Chat with an adapter through an OpenAI-compatible backend (vLLM, LoRAX's /v1, ours), using the official client.

vLLM serves a LoRA adapter as a model of its own (`--enable-lora --lora-modules NAME=PATH`, or loaded at run
time), so the adapter id is the request's `model` and the server applies the chat template.
"""

from __future__ import annotations

from collections.abc import Iterator

from . import base
from .base import ChatClient, ChatError, ChatRequest, mapped_errors, with_system_prompt


def _map_error(e: Exception, adapter_id: str | None, url: str) -> ChatError:
    import openai

    what = f"adapter {adapter_id}" if adapter_id else "the base model"
    body = getattr(e, "body", None)
    detail = body.get("message") if isinstance(body, dict) and isinstance(body.get("message"), str) else None
    detail = (detail or str(e) or type(e).__name__).splitlines()[0][:300]
    if isinstance(e, openai.APIConnectionError):
        return base.unreachable(url, e)
    if isinstance(e, openai.RateLimitError):
        return base.overloaded(detail)
    if isinstance(e, openai.NotFoundError):
        if adapter_id and ("model" in detail.lower() or adapter_id in detail):  # vLLM: "The model `x` does not exist."
            return ChatError(
                f"{what} is not served by the backend at {url}; start vLLM with --lora-modules "
                f"{adapter_id.rsplit('/', 1)[-1]}={adapter_id} or enable runtime LoRA loading"
            )
        return ChatError(f"the backend at {url} does not speak the OpenAI API (404 on /v1/chat/completions)")
    if isinstance(e, (openai.BadRequestError, openai.UnprocessableEntityError)):
        return base.rejected(detail)
    if isinstance(e, openai.AuthenticationError):
        return ChatError(f"the backend at {url} refused the API key (401); set the backend token")
    if isinstance(e, openai.APIStatusError) and adapter_id and adapter_id in detail:
        return ChatError(detail)  # the backend's message names the adapter already (e.g. it cannot be loaded)
    if isinstance(e, openai.APIError):
        return ChatError(f"the backend could not run {what}: {detail}")
    return ChatError(f"the backend failed: {detail}")


class OpenAIChatClient(ChatClient):
    """A thin layer over openai.OpenAI pointed at `<url>/v1`; the adapter id is the model name."""

    def __init__(self, url: str, *, auth_token: str | None = None, timeout: int = 120) -> None:
        import openai

        self.url = url.rstrip("/")
        base = self.url if self.url.endswith("/v1") else f"{self.url}/v1"
        # max_retries=1: a refused connection or a 429 is said at once, not after the client's backoff
        self.client = openai.OpenAI(base_url=base, api_key=auth_token or "none", timeout=timeout, max_retries=1)
        self.model_id: str | None = None

    def check(self) -> str:
        """The base model's name (the listed model without a parent)."""
        if self.model_id is None:
            with mapped_errors(_map_error, None, self.url):
                models = list(self.client.models.list())
            if not models:
                raise ChatError(f"the backend at {self.url} lists no models on /v1/models")
            base = [m for m in models if not getattr(m, "parent", None)]
            self.model_id = (base or models)[0].id
        return self.model_id

    def _stream(self, request: ChatRequest) -> Iterator[str]:
        """The reply through /v1/chat/completions (`adapter_source` / `api_token` are LoRAX's; vLLM has no such)."""
        settings, adapter_id = request.settings, request.adapter_id
        msgs = with_system_prompt(request.messages, request.system_prompt)
        kw: dict = {"max_tokens": settings.max_new_tokens}
        if settings.sampling:
            kw.update(temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed)
        else:
            kw["temperature"] = 0.0
        if settings.stop:
            kw["stop"] = settings.stop
        model = adapter_id or self.check()
        with mapped_errors(_map_error, adapter_id, self.url):
            for chunk in self.client.chat.completions.create(
                model=model, messages=msgs, stream=True, **{k: v for k, v in kw.items() if v is not None}
            ):
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        yield choice.delta.content
