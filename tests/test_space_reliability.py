"""Reliability matrix, Space rows: what people type into the Space, sent through gradio_client to the running
Space (a real process, real HTTP, the session's backend behind it). Each answer is one readable line in the chat,
never a crash, and the Space goes on answering correctly afterwards."""

import pytest

from soppu_hub.clients import GenerationSettings
from soppu_hub.clients.lorax import LoraxChatClient

pytestmark = pytest.mark.e2e  # real servers over loopback

ADAPTER = "alice/support-bot-soppu"

REFUSED_IDS = {
    "an absolute path": "/home/alice/loras/support-bot",
    "a relative path": "./loras/support-bot",
    "a home path": "~/loras/support-bot",
    "a Windows path": "C:\\loras\\support-bot",
    "a climbing path": "../../etc/passwd",
    "an https URL": "https://huggingface.co/alice/support-bot-soppu",
    "a file URL": "file:///etc/passwd",
    "an id with a space inside": "alice/support bot-soppu",
    "an id with a space after the slash": "alice/ support-bot-soppu",
    "an owner alone": "alice",
    "three parts": "alice/support/bot",
}


@pytest.fixture(scope="module")
def chat(space):
    from gradio_client import Client

    client = Client(space, verbose=False)
    return lambda message, adapter, history=(): client.predict(message, list(history), adapter, api_name="/chat")


@pytest.fixture(scope="module")
def reference(backend):
    return LoraxChatClient(backend).complete(
        [{"role": "user", "content": "Hello!"}], ADAPTER, settings=GenerationSettings(max_new_tokens=32)
    )


@pytest.mark.parametrize("case", list(REFUSED_IDS))
def test_paths_urls_and_malformed_ids_are_refused_in_one_line(chat, case):
    reply = chat("Hello!", REFUSED_IDS[case])
    assert reply.startswith("⚠️") and "not a Hub repo id" in reply and "\n" not in reply, reply


def test_an_id_with_spaces_around_it_is_the_id(chat, reference):
    assert chat("Hello!", f"  {ADAPTER}  ") == reference


@pytest.mark.parametrize("message", ["", "   ", "\n\t"])
def test_an_empty_message_asks_for_one(chat, message):
    assert chat(message, ADAPTER) == "⚠️ type a message first"


def test_a_100k_character_message_says_it_is_too_long_and_the_space_goes_on(chat, reference):
    reply = chat("lorem ipsum " * 8334, ADAPTER)
    assert reply.startswith("⚠️ the conversation is too long for this model") and "\n" not in reply, reply[:300]
    assert chat("Hello!", ADAPTER) == reference  # nothing stuck: the next message is answered as before


def test_base_model_id_is_accepted_as_the_cli_does(chat, backend):
    reply = chat("Hello!", "__base_model__")
    expected = LoraxChatClient(backend).complete(
        [{"role": "user", "content": "Hello!"}], None, settings=GenerationSettings(max_new_tokens=32)
    )
    assert reply == expected and not reply.startswith("⚠️")
