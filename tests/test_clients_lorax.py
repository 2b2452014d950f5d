"""The chat client (lorax-client underneath) and `soppu-hub chat` against the running backend."""

import pytest
from helpers import chat_cli

from soppu_hub.clients import ChatError, GenerationSettings
from soppu_hub.clients.lorax import LoraxChatClient

pytestmark = pytest.mark.e2e  # real servers over loopback


def test_chat_template_from_backend_and_streamed_reply(backend):
    client = LoraxChatClient(backend)
    prompt = client.render([{"role": "user", "content": "Hi there"}], system_prompt="Be brief.")
    assert prompt == "<|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    settings = GenerationSettings(max_new_tokens=12)
    pieces = list(
        client.stream([{"role": "user", "content": "Hi there"}], "alice/support-bot-soppu", settings=settings)
    )
    assert len(pieces) >= 1
    from lorax import Client

    direct = Client(backend).generate(
        prompt.replace("<|system|>\nBe brief.</s>\n", ""), max_new_tokens=12, adapter_id="alice/support-bot-soppu"
    )
    assert "".join(pieces) == direct.generated_text


def test_template_falls_back_to_the_hub(hub, backend, monkeypatch):
    from lab.samples import CHAT_TEMPLATE
    from soppu_hub.clients.lorax import FALLBACK_TEMPLATE

    client = LoraxChatClient(backend)
    monkeypatch.setattr(client, "info", lambda: {"model_id": hub.base_model})  # a real LoRAX /info has no template
    assert CHAT_TEMPLATE != FALLBACK_TEMPLATE
    assert client.chat_template() == CHAT_TEMPLATE  # the base model's own, read from tokenizer_config.json on the Hub


def test_errors_are_clear(backend):
    client = LoraxChatClient(backend)
    with pytest.raises(ChatError, match="adapter alice/nope cannot be loaded: not found on the Hub, or private"):
        list(client.stream([{"role": "user", "content": "x"}], "alice/nope"))
    with pytest.raises(ChatError, match="rejected the request"):
        list(client.stream([{"role": "user", "content": "x"}], settings=GenerationSettings(max_new_tokens=100_000)))
    with pytest.raises(
        ChatError, match=r"cannot reach the backend at http://127.0.0.1:9 \(nothing is listening there\)$"
    ):
        LoraxChatClient("http://127.0.0.1:9").chat_template()
    gone = LoraxChatClient("http://127.0.0.1:9")
    gone._template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # past the template: lorax-client's own call
    )
    with pytest.raises(ChatError) as e:  # the streaming path says it in words too, with no class names
        list(gone.stream([{"role": "user", "content": "x"}]))
    assert "Error" not in str(e.value) and "cannot reach the backend" in str(e.value)


def test_terminal_chat(backend):
    res = chat_cli(
        "alice/support-bot-soppu", "--url", backend, "--max-new-tokens", 6, typed="Hello\nAnd again\n/exit\n"
    )
    assert res.returncode == 0, res.stderr
    assert "chatting with alice/support-bot-soppu" in res.stderr
    # one streamed reply per line typed, each the reply the client gets for the same conversation
    client, history, expected = LoraxChatClient(backend), [], ""
    for line in ("Hello", "And again"):
        history.append({"role": "user", "content": line})
        reply = "".join(
            client.stream(history, "alice/support-bot-soppu", settings=GenerationSettings(max_new_tokens=6))
        )
        history.append({"role": "assistant", "content": reply})
        expected += reply + "\n"
    assert res.stdout == expected and len(expected) > 2
    res = chat_cli("alice/nope", "--url", backend, typed="hi\n")
    assert res.returncode == 2 and "adapter alice/nope cannot be loaded: not found on the Hub, or private" in res.stderr
