"""What every chat client shares: the interface, the settings, the errors and the sentences a person reads."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import SoppuError


class ChatError(SoppuError):
    """The backend refused or failed; the message says why in words a person can act on."""


@dataclass
class GenerationSettings:
    """How one reply is generated, whichever API carries it."""

    max_new_tokens: int = 128
    temperature: float | None = None  # None or 0: greedy
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None

    @property
    def sampling(self) -> bool:
        return bool(self.temperature) and self.temperature > 0


@dataclass
class ChatRequest:
    """One reply asked of a backend: what `ChatClient.stream` hands each backend's `_stream`."""

    messages: list[dict]
    adapter_id: str | None = None  # None: the base model
    adapter_source: str = "hub"  # LoRAX's; vLLM has no such
    api_token: str | None = None  # LoRAX's: a token for a private adapter repo
    system_prompt: str | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)


class ChatClient(ABC):
    """A backend that streams an adapter's reply to chat messages (the Space and `soppu-hub chat` take any)."""

    url: str
    model_id: str | None

    @abstractmethod
    def check(self) -> str:
        """The base model's id; fails early, before the first prompt, when the backend is not there."""

    def prompt_size(self, messages: list[dict], system_prompt: str | None = None) -> tuple[int, int] | None:
        """(tokens of the prompt these messages make, the most the backend takes), when the backend can say:
        a message too long is refused before it is sent. None: it cannot (the request says so itself)."""
        return None

    def stream(
        self,
        messages: list[dict],
        adapter_id: str | None = None,
        *,
        adapter_source: str = "hub",
        api_token: str | None = None,
        system_prompt: str | None = None,
        settings: GenerationSettings | None = None,
    ) -> Iterator[str]:
        """Yield the reply's text piece by piece as the backend produces tokens (adapter_id None: the base)."""
        request = ChatRequest(messages, adapter_id, adapter_source, api_token, system_prompt)
        if settings is not None:
            request.settings = settings
        return self._stream(request)

    @abstractmethod
    def _stream(self, request: ChatRequest) -> Iterator[str]:
        """The backend's own streaming call."""

    def complete(self, messages: list[dict], adapter_id: str | None = None, **kw) -> str:
        return "".join(self.stream(messages, adapter_id, **kw))


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Plain role/content messages; a system prompt replaces any system message the history carries."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system_prompt:
        msgs = [{"role": "system", "content": system_prompt}] + [m for m in msgs if m["role"] != "system"]
    return msgs


# The sentences both clients (LoRAX's and OpenAI's) say, so a person reads the same words whichever API it is.
def overloaded(detail: str) -> ChatError:
    return ChatError(f"the backend is overloaded right now; try again in a moment ({detail})")


def rejected(detail: str) -> ChatError:
    return ChatError(f"the backend rejected the request: {detail}")


def unreachable(url: str, e: BaseException) -> ChatError:
    return ChatError(f"cannot reach the backend at {url} ({unreachable_reason(e)})")


def unreachable_reason(e: BaseException) -> str:
    """Why a connection failed, in words (no exception class names: a Space visitor reads this)."""
    text = f"{getattr(e, 'reason', '')} {e} {e.__cause__ or ''} {e.__context__ or ''}".lower()
    for needle, words in (
        ("refused", "nothing is listening there"),
        ("timed out", "no answer in time"),
        ("timeout", "no answer in time"),
        ("name or service not known", "unknown host name"),
        ("nodename nor servname", "unknown host name"),
        ("reset", "the connection was dropped"),
        ("ssl", "TLS handshake failed"),
    ):
        if needle in text:
            return words
    return "the connection failed"


@contextmanager
def mapped_errors(
    mapper: Callable[[Exception, str | None, str], ChatError], adapter_id: str | None, url: str
) -> Iterator[None]:
    """A client library's (and the network's) exceptions become one ChatError through `mapper`; ours pass through."""
    try:
        yield
    except ChatError:
        raise
    except Exception as e:
        raise mapper(e, adapter_id, url) from None
