"""Chat with an adapter through any LoRAX-compatible backend, using the official lorax-client (`connect` picks
this or the OpenAI-compatible client in openai_chat.py).

Used by the Space and by `soppu-hub chat`. Chat messages become a prompt with the base model's own chat
template, fetched once (the backend's /info when it offers one, else the base model's tokenizer_config.json
on the Hub), and lorax-client's exceptions become one clear message.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator

from ..errors import SoppuError

FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatError(SoppuError):
    """The backend refused or failed; the message says why in words a person can act on."""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float | None = None  # None or 0: greedy
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None

    def params(self) -> dict:
        sample = bool(self.temperature) and self.temperature > 0
        return {"max_new_tokens": self.max_new_tokens, "do_sample": sample,
                "temperature": self.temperature if sample else None, "top_p": self.top_p if sample else None,
                "seed": self.seed if sample else None, "stop_sequences": self.stop}


# The sentences both clients (LoRAX's and OpenAI's) say, so a person reads the same words whichever API it is.
def overloaded(detail: str) -> ChatError:
    return ChatError(f"the backend is overloaded right now; try again in a moment ({detail})")


def rejected(detail: str) -> ChatError:
    return ChatError(f"the backend rejected the request: {detail}")


def unreachable(url: str, e: BaseException) -> ChatError:
    return ChatError(f"cannot reach the backend at {url} ({unreachable_reason(e)})")


def _map_error(e: Exception, adapter_id: str | None, url: str) -> ChatError:
    from lorax import errors as le

    what = f"adapter {adapter_id}" if adapter_id else "the base model"
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, le.GenerationError):  # the backend's message names the adapter already when it is about it
        return ChatError(detail if adapter_id and adapter_id in detail else f"the backend could not run {what}: {detail}")
    if isinstance(e, (le.OverloadedError, le.RateLimitExceededError)):
        return overloaded(detail)
    if isinstance(e, (le.ValidationError, le.UnprocessableEntityError, le.BadRequestError)):
        if "`inputs` must have less than" in detail:  # LoRAX's wording for a prompt over max_input_length
            return ChatError(f"the conversation is too long for this model; clear the chat or send a shorter message "
                             f"({detail.split('`inputs` ', 1)[1]})")
        return rejected(detail)
    if isinstance(e, (le.ShardNotReadyError, le.ShardTimeoutError)):
        return ChatError(f"the backend is not ready: {detail}")
    if isinstance(e, le.NotFoundError):
        return ChatError(f"the backend at {url} does not speak the LoRAX API (404)")
    if isinstance(e, (OSError, ConnectionError)) or type(e).__module__.startswith(("requests", "aiohttp", "urllib3")):
        return unreachable(url, e)
    return ChatError(f"the backend failed: {detail}")


def _session():
    import requests
    from requests.adapters import HTTPAdapter, Retry

    session = requests.Session()
    adapter = HTTPAdapter(max_retries=Retry(total=2, connect=2, read=0, status=0, backoff_factor=0.2))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@contextmanager
def mapped_errors(mapper: Callable[[Exception, str | None, str], ChatError], adapter_id: str | None, url: str
                  ) -> Iterator[None]:
    """A client library's (and the network's) exceptions become one ChatError through `mapper`; ours pass through."""
    try:
        yield
    except ChatError:
        raise
    except Exception as e:
        raise mapper(e, adapter_id, url) from None


def unreachable_reason(e: BaseException) -> str:
    """Why a connection failed, in words (no exception class names: a Space visitor reads this)."""
    text = f"{getattr(e, 'reason', '')} {e} {e.__cause__ or ''} {e.__context__ or ''}".lower()
    for needle, words in (("refused", "nothing is listening there"), ("timed out", "no answer in time"),
                          ("timeout", "no answer in time"), ("name or service not known", "unknown host name"),
                          ("nodename nor servname", "unknown host name"), ("reset", "the connection was dropped"),
                          ("ssl", "TLS handshake failed")):
        if needle in text:
            return words
    return "the connection failed"


class ChatClient:
    """A thin typed layer over lorax.Client / lorax.AsyncClient."""

    def __init__(self, url: str, *, auth_token: str | None = None, timeout: int = 120) -> None:
        from lorax import AsyncClient, Client

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else None
        # lorax-client's own session retries a refused connection with backoff for three minutes, and a 429 too:
        # a chat should say "not reachable" or "overloaded" at once, so it gets a session that retries briefly
        self.client = Client(self.url, headers=headers, timeout=timeout, session=_session(), max_session_retries=0)
        self.aclient = AsyncClient(self.url, headers=headers, timeout=timeout)
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
            raise ChatError(f"the backend at {self.url} does not speak the LoRAX API ({e.code} on /info); "
                            "for vLLM or another OpenAI-compatible server use --api openai (BACKEND_API=openai)") from None
        except OSError as e:
            raise unreachable(self.url, e) from None
        except ValueError:
            raise ChatError(f"the backend at {self.url} does not speak the LoRAX API (/info is not JSON)") from None

    def check(self) -> str:
        """The base model's id; fails early, before the first prompt, when the backend is not there."""
        self.chat_template()
        return self.model_id or "the base model"

    def chat_template(self) -> str:
        """Fetched once: /info's chat_template, else the base model's tokenizer_config.json on the Hub."""
        if self._template is None:
            info = self.info()
            self.model_id = info.get("model_id")
            template = info.get("chat_template")
            if not template and self.model_id:
                template = self._template_from_hub(self.model_id)
            self._template = template or FALLBACK_TEMPLATE
        return self._template

    def _template_from_hub(self, model_id: str) -> str | None:
        from huggingface_hub import hf_hub_download

        try:
            cfg = json.loads(open(hf_hub_download(model_id, "tokenizer_config.json")).read())
        except Exception:
            return None
        for key in ("bos_token", "eos_token"):
            tok = cfg.get(key)
            self._specials[key] = tok.get("content", "") if isinstance(tok, dict) else (tok or "")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if not template:  # transformers >= 4.43 saves it beside the config instead
            try:
                template = open(hf_hub_download(model_id, "chat_template.jinja")).read()
            except Exception:
                return None
        return template

    def render(self, messages: list[dict], system_prompt: str | None = None) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        if system_prompt:
            msgs = [{"role": "system", "content": system_prompt}] + [m for m in msgs if m["role"] != "system"]
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg: str):
            raise ChatError(f"the chat template refused the conversation: {msg}")

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template()).render(messages=msgs, add_generation_prompt=True, **self._specials)

    # --- generation ------------------------------------------------------------------------------
    def _mapped_errors(self, adapter_id: str | None):
        return mapped_errors(_map_error, adapter_id, self.url)

    def _request(self, messages: list[dict], adapter_id: str | None, adapter_source: str, api_token: str | None,
                 system_prompt: str | None, settings: GenerationSettings | None) -> tuple[str, dict]:
        """(prompt, lorax-client keyword arguments) for one reply."""
        kw = {k: v for k, v in (settings or GenerationSettings()).params().items() if v is not None}
        if adapter_id:
            kw.update(adapter_id=adapter_id, adapter_source=adapter_source)
            if api_token:
                kw["api_token"] = api_token
        return self.render(messages, system_prompt), kw

    def stream(self, messages: list[dict], adapter_id: str | None = None, *, adapter_source: str = "hub",
               api_token: str | None = None, system_prompt: str | None = None,
               settings: GenerationSettings | None = None) -> Iterator[str]:
        """Yield the reply's text piece by piece as the backend produces tokens."""
        prompt, kw = self._request(messages, adapter_id, adapter_source, api_token, system_prompt, settings)
        with self._mapped_errors(adapter_id):
            for resp in self.client.generate_stream(prompt, **kw):
                if not resp.token.special:
                    yield resp.token.text

    def complete(self, messages: list[dict], adapter_id: str | None = None, **kw) -> str:
        return "".join(self.stream(messages, adapter_id, **kw))

    async def astream(self, messages: list[dict], adapter_id: str | None = None, *, adapter_source: str = "hub",
                      api_token: str | None = None, system_prompt: str | None = None,
                      settings: GenerationSettings | None = None) -> AsyncIterator[str]:
        """The same as `stream`, for asyncio callers (lorax.AsyncClient underneath)."""
        prompt, kw = self._request(messages, adapter_id, adapter_source, api_token, system_prompt, settings)
        with self._mapped_errors(adapter_id):
            async for resp in self.aclient.generate_stream(prompt, **kw):
                if not resp.token.special:
                    yield resp.token.text


APIS = ("lorax", "openai")


def connect(url: str, *, api: str = "lorax", auth_token: str | None = None):
    """The chat client for a backend: LoRAX's REST API (lorax-client) or OpenAI's /v1 (vLLM), same surface."""
    if api == "openai":
        from .openai import OpenAIChatClient

        return OpenAIChatClient(url, auth_token=auth_token)
    if api != "lorax":
        raise ChatError(f"unknown backend API {api!r}: use lorax (LoRAX, soppu-hub serve) or openai (vLLM, /v1)")
    return ChatClient(url, auth_token=auth_token)
