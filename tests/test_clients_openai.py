"""The OpenAI-compatible side: the embedded backend's /v1 routes under the official `openai` client, and the
Space and `soppu-hub chat` talking /v1/chat/completions with the adapter id as the model, as vLLM serves LoRAs."""

import os
import subprocess
import sys

import pytest
from helpers import chat_cli

from soppu_hub.clients import ChatError, GenerationSettings, connect
from soppu_hub.clients.lorax import LoraxChatClient
from soppu_hub.clients.openai import OpenAIChatClient

pytestmark = pytest.mark.e2e  # real servers over loopback

ADAPTER = "alice/support-bot-soppu"
HELLO = [{"role": "user", "content": "Hello!"}]


def test_official_openai_client_against_the_backend(backend):
    import openai

    client = openai.OpenAI(base_url=f"{backend}/v1", api_key="none", max_retries=0)
    lorax_reply = LoraxChatClient(backend).complete(HELLO, ADAPTER, settings=GenerationSettings(max_new_tokens=12))
    out = client.chat.completions.create(model=ADAPTER, messages=HELLO, max_tokens=12, temperature=0)
    assert out.choices[0].message.content == lorax_reply and out.usage.completion_tokens <= 12
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=ADAPTER, messages=HELLO, max_tokens=12, temperature=0, stream=True
        )
    )
    assert streamed == lorax_reply
    models = client.models.list().data
    assert models[0].parent is None and any(m.id == ADAPTER and m.parent == models[0].id for m in models[1:])
    with pytest.raises(openai.APIStatusError) as e:  # an OpenAI-shaped error body, LoRAX's status code
        client.chat.completions.create(model="alice/no-such-adapter", messages=HELLO, max_tokens=4)
    assert e.value.status_code == 424 and "alice/no-such-adapter cannot be loaded" in e.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=ADAPTER, messages=HELLO, max_tokens=-1)


def test_openai_chat_client_gives_the_same_replies_as_lorax(backend):
    oa, lx = connect(backend, api="openai"), connect(backend, api="lorax")
    assert isinstance(oa, OpenAIChatClient) and oa.check() == lx.check()
    settings = GenerationSettings(max_new_tokens=10)
    for adapter in (ADAPTER, None):  # None: the base model
        assert oa.complete(HELLO, adapter, settings=settings) == lx.complete(HELLO, adapter, settings=settings)
    system = lx.complete(HELLO, ADAPTER, system_prompt="Be brief.", settings=settings)
    assert oa.complete(HELLO, ADAPTER, system_prompt="Be brief.", settings=settings) == system


def test_openai_errors_are_one_line_in_words(backend, hub_server):
    with pytest.raises(
        ChatError, match="adapter alice/no-such-adapter cannot be loaded: not found on the Hub, or private"
    ):
        OpenAIChatClient(backend).complete(HELLO, "alice/no-such-adapter")
    with pytest.raises(
        ChatError, match=r"cannot reach the backend at http://127.0.0.1:9 \(nothing is listening there\)$"
    ):
        OpenAIChatClient("http://127.0.0.1:9").check()
    # a server that speaks something else: each client says which API it expected
    with pytest.raises(ChatError, match="does not speak the OpenAI API"):
        OpenAIChatClient(hub_server[0].url).complete(HELLO, ADAPTER)
    with pytest.raises(ChatError, match="does not speak the LoRAX API .*use --api openai"):
        LoraxChatClient(hub_server[0].url).check()
    with pytest.raises(ChatError, match="unknown backend API 'grpc'"):
        connect(backend, api="grpc")


def test_terminal_chat_over_openai(backend):
    res = chat_cli(ADAPTER, "--url", backend, "--api", "openai", "--max-new-tokens", 6, typed="Hello!\n/exit\n")
    assert res.returncode == 0, res.stderr
    assert (
        res.stdout.strip()
        == LoraxChatClient(backend).complete(HELLO, ADAPTER, settings=GenerationSettings(max_new_tokens=6)).strip()
    )
    res = chat_cli(ADAPTER, "--url", "http://127.0.0.1:9", "--api", "openai")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "nothing is listening there" in res.stderr


def test_space_over_openai(backend):
    from gradio_client import Client

    from soppu_hub.launch import start_space

    child = start_space(
        dict(os.environ, LORAX_URL=backend, BACKEND_API="openai", SOPPU_AUTHOR="alice", SOPPU_MAX_NEW_TOKENS="32")
    )
    try:
        reply = Client(child.url, verbose=False).submit("Hello!", [], ADAPTER, api_name="/chat").result()
    finally:
        child.stop()
    assert reply == LoraxChatClient(backend).complete(HELLO, ADAPTER, settings=GenerationSettings(max_new_tokens=32))
    res = subprocess.run(
        [sys.executable, "space/app.py"],
        env=dict(os.environ, LORAX_URL=backend, BACKEND_API="grpc"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith(
        "error: BACKEND_API='grpc' is not one of"
    )
