"""The Space as a person and a program meet it: gradio_client on the `chat` endpoint, a real headless Chromium."""

from pathlib import Path

import pytest

from soppu_hub.chat import ChatClient, GenerationSettings
from soppu_hub.errors import SoppuError
from soppu_hub.spacekit import history_to_messages, validate_repo_id

pytestmark = pytest.mark.e2e  # real servers over loopback

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_repo_id_validation_and_history_blocks():
    assert validate_repo_id(" alice/my-lora-soppu ") == "alice/my-lora-soppu"
    for bad in ["", "/etc/passwd", "../x/y", "https://example.com/a/b", "alice", "a/b/c", "~/lora"]:
        with pytest.raises(SoppuError):
            validate_repo_id(bad)
    history = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "yo"}]
    assert history_to_messages(history) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_gradio_client_streams_the_chat_endpoint(space, backend):
    from gradio_client import Client

    client = Client(space, verbose=False)
    job = client.submit("Hello!", [], "alice/support-bot-soppu", api_name="/chat")
    outputs = list(job)
    final = job.result()
    assert len(outputs) >= 2 and final  # streamed: several partial replies, then the whole one
    assert all(final.startswith(o) for o in outputs)
    expected = ChatClient(backend).complete([{"role": "user", "content": "Hello!"}], "alice/support-bot-soppu",
                                            settings=GenerationSettings(max_new_tokens=32))
    assert final == expected
    bad = client.submit("Hello!", [], "../etc/passwd", api_name="/chat").result()
    assert bad.startswith("⚠️") and "not a Hub repo id" in bad
    missing = client.submit("Hello!", [], "alice/no-such-adapter", api_name="/chat").result()
    assert missing.startswith("⚠️") and "adapter alice/no-such-adapter cannot be loaded: not found on the Hub, or private" in missing
    assert missing.count("alice/no-such-adapter") == 1 and "Error" not in missing and "hf auth login" not in missing


def test_browser_picks_an_adapter_chats_and_sees_the_plot(space, tmp_path):
    assert Path(CHROMIUM).exists(), "browser tests need Debian's chromium (apt-get install chromium); .ci/run installs it"
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(space)
            picker = page.locator("#adapter-picker input")
            picker.click()
            page.get_by_role("option", name="alice/support-bot-soppu").click()
            expect(page.locator("#card-summary")).to_contain_text("alice/support-bot-soppu", timeout=30_000)
            expect(page.locator("#card-summary")).to_contain_text("compression ratio")
            expect(page.locator("#card-summary")).to_contain_text("shares its bases with 1 other adapter(s): cluster 0 of 1")
            page.wait_for_function(
                "() => { const i = document.querySelector('#error-plot img'); return i && i.complete && i.naturalWidth > 0 }",
                timeout=30_000)
            box = page.locator("#message textarea")

            def send(text: str) -> None:
                expect(box).to_be_enabled(timeout=60_000)  # locked while a reply streams
                box.fill(text)
                box.press("Enter")
                expect(page.locator("#chat-adapter")).to_contain_text(text, timeout=30_000)
                expect(box).to_have_value("")
                expect(box).to_be_enabled(timeout=60_000)

            send("Hello there!")
            bot = page.locator("#chat-adapter .bot, #chat-adapter [data-testid='bot']").last
            expect(bot).not_to_be_empty(timeout=10_000)
            expect(page.locator("#chat-adapter")).to_contain_text("Hello there!")
            page.screenshot(path=str(tmp_path / "space.png"), full_page=True)
            assert (tmp_path / "space.png").stat().st_size > 10_000
            # the original adapter beside it, labelled with its repo id, the conversation starting afresh in both
            page.get_by_label("the original adapter").check()
            expect(page.locator("#chat-base")).to_be_visible()
            expect(page.locator("#chat-base")).to_contain_text("alice/support-bot", timeout=10_000)
            expect(page.locator("#chat-adapter")).not_to_contain_text("Hello there!")
            send("Tell me more")
            expect(page.locator("#chat-base")).to_contain_text("Tell me more")
            expect(page.locator("#chat-base .bot, #chat-base [data-testid='bot']").last).not_to_be_empty()
            original_reply = page.locator("#chat-base .bot, #chat-base [data-testid='bot']").last.inner_text()
            assert "⚠️" not in original_reply
            page.screenshot(path=str(tmp_path / "space-compare.png"), full_page=True)
            # a typed id that does not exist: the error is shown in the chat, not a crash
            picker.fill("alice/no-such-adapter")
            picker.press("Enter")
            expect(page.locator("#chat-adapter")).to_contain_text("alice/no-such-adapter", timeout=30_000)  # pane relabelled
            # a new adapter, a new conversation: the old one is gone from both panes
            expect(page.locator("#chat-adapter")).not_to_contain_text("Tell me more", timeout=10_000)
            expect(page.locator("#chat-base")).not_to_contain_text("Tell me more")
            send("Anyone there?")
            expect(page.locator("#chat-adapter")).to_contain_text("adapter alice/no-such-adapter cannot be loaded: not found on the Hub, or private")
            # a path typed as the adapter: one line in the chat, and the page goes on working
            picker.fill("/etc/passwd")
            picker.press("Enter")
            expect(page.locator("#chat-adapter")).to_contain_text("/etc/passwd", timeout=30_000)  # switched: pane relabelled
            send("And now?")
            expect(page.locator("#chat-adapter")).to_contain_text("not a Hub repo id")
        finally:
            browser.close()
