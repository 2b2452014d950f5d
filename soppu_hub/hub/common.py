"""What every Hub call shares: its errors, retries of transient failures, repo ids, the endpoint."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from ..errors import SoppuError

T = TypeVar("T")

# The help of every --token flag (compress, join): how huggingface_hub finds one when none is given.
TOKEN_HELP = "Hub token (default: HF_TOKEN or the one saved by `hf auth login`)"


class HubError(SoppuError):
    """A Hub operation failed in a way the user can fix (not found, no access, offline...). `reason` says which,
    in a few words fit for any audience (a server relays it instead of the CLI's advice)."""

    def __init__(self, message: str, reason: str = "the Hub refused the request") -> None:
        super().__init__(message)
        self.reason = reason


class PushError(SoppuError):
    """Some repos were pushed and some were not; the message lists both."""


def is_repo_id(text: str) -> bool:
    """`owner/name` as the Hub spells it (huggingface_hub's own rule), never a path or a URL."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.count("/") != 1 or text.startswith((".", "/", "~")) or "\\" in text or "://" in text:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def retry(fn: Callable[[], T], what: str, attempts: int = 3, wait: float = 1.0) -> T:
    """Retry transient failures (connection errors, timeouts, 5xx), then stop with a clear message."""
    import requests
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    for i in range(attempts):
        try:
            return fn()
        except (requests.ConnectionError, requests.Timeout) as e:
            reason = type(e).__name__
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status is None or status < 500:
                raise
            reason = f"HTTP {status}"
        if i + 1 < attempts:
            time.sleep(wait * 2**i)
    raise HubError(
        f"{what}: cannot reach the Hub at {constants.ENDPOINT} ({reason}, {attempts} tries); "
        "check your network or HF_ENDPOINT and try again",
        "the Hub cannot be reached",
    )


@contextmanager
def use_endpoint(url: str) -> Iterator[None]:
    """huggingface_hub parses commit URLs against its process-wide endpoint: point it at `url`, then restore it."""
    from huggingface_hub import constants

    saved = constants.ENDPOINT
    constants.ENDPOINT = url
    try:
        yield
    finally:
        constants.ENDPOINT = saved
