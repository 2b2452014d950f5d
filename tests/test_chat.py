"""The chat client (lorax-client underneath) and `soppu-hub chat` against the running backend."""

import asyncio
import os
import subprocess
import sys

import pytest

from soppu_hub.chat import ChatClient, ChatError, GenerationSettings


def test_chat_template_from_backend_and_streamed_reply(backend):
    client = ChatClient(backend)
    prompt = client.render([{"role": "user", "content": "Hi there"}], system_prompt="Be brief.")
    assert prompt == "<|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    settings = GenerationSettings(max_new_tokens=12)
    pieces = list(client.stream([{"role": "user", "content": "Hi there"}], "alice/support-bot-soppu", settings=settings))
    assert len(pieces) >= 1
    from lorax import Client

    direct = Client(backend).generate(prompt.replace("<|system|>\nBe brief.</s>\n", ""), max_new_tokens=12,
                                      adapter_id="alice/support-bot-soppu")
    assert "".join(pieces) == direct.generated_text

    async def run():
        return "".join([p async for p in client.astream([{"role": "user", "content": "Hi there"}], "alice/support-bot-soppu",
                                                         settings=settings)])

    assert asyncio.run(run()) == direct.generated_text


def test_template_falls_back_to_the_hub(hub, backend, monkeypatch):
    client = ChatClient(backend)
    monkeypatch.setattr(client, "info", lambda: {"model_id": hub.base_model})  # a real LoRAX /info has no template
    assert "<|assistant|>" in client.chat_template()


def test_errors_are_clear(backend):
    client = ChatClient(backend)
    with pytest.raises(ChatError, match="could not run adapter alice/nope"):
        list(client.stream([{"role": "user", "content": "x"}], "alice/nope"))
    with pytest.raises(ChatError, match="rejected the request"):
        list(client.stream([{"role": "user", "content": "x"}], settings=GenerationSettings(max_new_tokens=100_000)))
    with pytest.raises(ChatError, match="cannot reach the backend"):
        ChatClient("http://127.0.0.1:9").chat_template()


def test_terminal_chat(backend):
    res = subprocess.run([sys.executable, "-m", "soppu_hub", "chat", "alice/support-bot-soppu", "--url", backend,
                          "--max-new-tokens", "6"], input="Hello\nAnd again\n/exit\n", capture_output=True, text=True,
                         env=dict(os.environ), timeout=120)
    assert res.returncode == 0, res.stderr
    assert "chatting with alice/support-bot-soppu" in res.stderr
    assert res.stdout.count("\n") >= 2 and res.stdout.strip()  # a streamed reply per line typed
    res = subprocess.run([sys.executable, "-m", "soppu_hub", "chat", "alice/nope", "--url", backend], input="hi\n",
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "could not run adapter alice/nope" in res.stderr
