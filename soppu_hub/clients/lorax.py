"""Chat through LoRAX's REST API (a LoRAX server, `soppu-hub serve`) with the official lorax-client.

Chat messages become a prompt with the base model's own chat template, fetched once (the backend's /info
when it offers one, else the base model's tokenizer_config.json on the Hub); lorax-client's exceptions become
one clear message.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

from .base import (
    ChatClient,
    ChatError,
    ChatRequest,
    GenerationSettings,
    mapped_errors,
    overloaded,
    rejected,
    unreachable,
    with_system_prompt,
)

FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _map_error(e: Exception, adapter_id: str | None, url: str) -> ChatError:
    from lorax import errors as le

    what = f"adapter {adapter_id}" if adapter_id else "the base model"
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, le.GenerationError):  # the backend's message names the adapter already when it is about it
        return ChatError(
            detail if adapter_id and adapter_id in detail else f"the backend could not run {what}: {detail}"
        )
    if isinstance(e, (le.OverloadedError, le.RateLimitExceededError)):
        return overloaded(detail)
    if isinstance(e, (le.ValidationError, le.UnprocessableEntityError, le.BadRequestError)):
        if "`inputs` must have less than" in detail:  # LoRAX's wording for a prompt over max_input_length
            return ChatError(
                f"the conversation is too long for this model; clear the chat or send a shorter message "
                f"({detail.split('`inputs` ', 1)[1]})"
            )
        return rejected(detail)
    if isinstance(e, (le.ShardNotReadyError, le.ShardTimeoutError)):
        return ChatError(f"the backend is not ready: {detail}")
    if isinstance(e, le.NotFoundError):
        return ChatError(f"the backend at {url} does not speak the LoRAX API (404)")
    if isinstance(e, (OSError, ConnectionError)) or type(e).__module__.startswith(("requests", "aiohttp", "urllib3")):
        return unreachable(url, e)
    return ChatError(f"the backend failed: {detail}")


def _session():
    """lorax-client's own session retries a refused connection with backoff for three minutes, and a 429 too: a
    chat should say "not reachable" or "overloaded" at once, so it gets a session that retries briefly."""
    import requests
    from requests.adapters import HTTPAdapter, Retry

    session = requests.Session()
    adapter = HTTPAdapter(max_retries=Retry(total=2, connect=2, read=0, status=0, backoff_factor=0.2))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def lorax_parameters(settings: GenerationSettings) -> dict:
    """lorax-client's generate() keywords for these settings (sampling fields only when sampling)."""
    s = settings.sampling
    return {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": s,
        "temperature": settings.temperature if s else None,
        "top_p": settings.top_p if s else None,
        "seed": settings.seed if s else None,
        "stop_sequences": settings.stop,
    }


class LoraxChatClient(ChatClient):
    """A thin typed layer over lorax.Client."""

    def __init__(self, url: str, *, auth_token: str | None = None, timeout: int = 120) -> None:
        from lorax import Client

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else None
        self.client = Client(self.url, headers=headers, timeout=timeout, session=_session(), max_session_retries=0)
        self._headers = headers or {}
        self._template: str | None = None
        self._specials: dict[str, str] = {}
        self.model_id: str | None = None

    # --- prompt ----------------------------------------------------------------------------------
    def info(self) -> dict:
        req = urllib.request.Request(f"{self.url}/info", headers=self._headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise ChatError(
                f"the backend at {self.url} does not speak the LoRAX API ({e.code} on /info); "
                "for vLLM or another OpenAI-compatible server use --api openai (BACKEND_API=openai)"
            ) from None
        except OSError as e:
            raise unreachable(self.url, e) from None
        except ValueError:
            raise ChatError(f"the backend at {self.url} does not speak the LoRAX API (/info is not JSON)") from None

    def check(self) -> str:
        self.chat_template()
        return self.model_id or "the base model"

    def chat_template(self) -> str:
        """Fetched once: /info's chat_template, else the base model's tokenizer_config.json on the Hub."""
        if self._template is None:
            info = self.info()
            self.model_id = info.get("model_id")
            template = info.get("chat_template")
            if not template and self.model_id:
                from ..hub.info import chat_template

                template, self._specials = chat_template(self.model_id)
            self._template = template or FALLBACK_TEMPLATE
        return self._template

    def render(self, messages: list[dict], system_prompt: str | None = None) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg: str):
            raise ChatError(f"the chat template refused the conversation: {msg}")

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template()).render(
            messages=with_system_prompt(messages, system_prompt), add_generation_prompt=True, **self._specials
        )

    def prompt_size(self, messages: list[dict], system_prompt: str | None = None) -> tuple[int, int] | None:
        """LoRAX's /tokenize of the rendered prompt against /info's max_input_length."""
        try:
            limit = int(self.info()["max_input_length"])
            body = json.dumps({"inputs": self.render(messages, system_prompt)}).encode()
            headers = {**self._headers, "Content-Type": "application/json"}
            req = urllib.request.Request(f"{self.url}/tokenize", data=body, headers=headers)
            with urllib.request.urlopen(req, timeout=60) as r:
                return len(json.loads(r.read())), limit
        except (ChatError, OSError, ValueError, KeyError, TypeError):
            return None  # a backend without /tokenize: the request itself says when a prompt is too long

    # --- generation ------------------------------------------------------------------------------
    def _stream(self, request: ChatRequest) -> Iterator[str]:
        kw = {k: v for k, v in lorax_parameters(request.settings).items() if v is not None}
        if request.adapter_id:
            kw.update(adapter_id=request.adapter_id, adapter_source=request.adapter_source)
            if request.api_token:
                kw["api_token"] = request.api_token
        prompt = self.render(request.messages, request.system_prompt)
        with mapped_errors(_map_error, request.adapter_id, self.url):
            for resp in self.client.generate_stream(prompt, **kw):
                if not resp.token.special:
                    yield resp.token.text
