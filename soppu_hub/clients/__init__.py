"""Chat clients for serving backends (LoRAX's REST API, OpenAI's /v1) behind one interface, ChatClient."""

from __future__ import annotations

from .base import ChatClient, ChatError, GenerationSettings

APIS = ("lorax", "openai")

__all__ = ["APIS", "ChatClient", "ChatError", "GenerationSettings", "connect"]


def connect(url: str, *, api: str = "lorax", auth_token: str | None = None) -> ChatClient:
    """The chat client for a backend: LoRAX's REST API (lorax-client) or OpenAI's /v1 (vLLM), same interface."""
    if api == "openai":
        from .openai import OpenAIChatClient

        return OpenAIChatClient(url, auth_token=auth_token)
    if api != "lorax":
        raise ChatError(f"unknown backend API {api!r}: use lorax (LoRAX, soppu-hub serve) or openai (vLLM, /v1)")
    from .lorax import LoraxChatClient

    return LoraxChatClient(url, auth_token=auth_token)
