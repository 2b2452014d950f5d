"""The Space as a person and a program meet it: gradio_client on the `chat` endpoint, a real headless Chromium."""

import os
from pathlib import Path

import pytest

from lab.screenshot import CHROMIUM, launch_browser, open_space, wait_for_plot
from soppu_hub.clients import GenerationSettings
from soppu_hub.clients.lorax import LoraxChatClient

pytestmark = pytest.mark.e2e  # real servers over loopback
# Waits are hang guards, not timings: with two CPU hogs beside the suite on 2 cores a reply took over a minute.
GUARD_MS = 180_000


def test_gradio_client_streams_the_chat_endpoint(space, backend):
    from gradio_client import Client

    client = Client(space, verbose=False)
    job = client.submit("Hello!", [], "alice/support-bot-soppu", api_name="/chat")
    outputs = list(job)
    final = job.result()
    assert len(outputs) >= 2 and final  # streamed: several partial replies, then the whole one
    assert all(final.startswith(o) for o in outputs)
    expected = LoraxChatClient(backend).complete(
        [{"role": "user", "content": "Hello!"}],
        "alice/support-bot-soppu",
        settings=GenerationSettings(max_new_tokens=32),
    )
    assert final == expected
    # the base model by the CLI's name, and the UI's controls as keywords with the UI's defaults
    base = client.submit("Hello!", [], "__base_model__", api_name="/chat").result()
    assert base == LoraxChatClient(backend).complete(
        [{"role": "user", "content": "Hello!"}], None, settings=GenerationSettings(max_new_tokens=32)
    )
    short = client.submit("Hello!", [], "alice/support-bot-soppu", "", 0.0, 3, api_name="/chat").result()
    assert short == LoraxChatClient(backend).complete(
        [{"role": "user", "content": "Hello!"}],
        "alice/support-bot-soppu",
        settings=GenerationSettings(max_new_tokens=3),
    )
    bad = client.submit("Hello!", [], "../etc/passwd", api_name="/chat").result()
    assert bad.startswith("⚠️") and "not a Hub repo id" in bad
    missing = client.submit("Hello!", [], "alice/no-such-adapter", api_name="/chat").result()
    assert (
        missing.startswith("⚠️")
        and "adapter alice/no-such-adapter cannot be loaded: not found on the Hub, or private" in missing
    )
    assert missing.count("alice/no-such-adapter") == 1 and "Error" not in missing and "hf auth login" not in missing


def _artifacts(tmp_path: Path) -> Path:
    """Screenshots are kept: $SOPPU_TEST_ARTIFACTS when set (make screenshot points it at docs/), else tmp_path."""
    folder = Path(os.environ.get("SOPPU_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _browser(p):
    assert Path(CHROMIUM).exists(), (
        "browser tests need Debian's chromium (apt-get install chromium); .ci/run installs it"
    )
    return launch_browser(p)


@pytest.mark.parametrize("width,height", [(1300, 1000), (390, 844)])
def test_browser_picks_an_adapter_chats_and_sees_the_plot(space, tmp_path, width, height):
    """Picking, chatting, comparing, typing an exact id, refreshing and bad ids, at desktop and at phone width."""
    from playwright.sync_api import expect, sync_playwright

    shots = _artifacts(tmp_path) / f"{width}"
    shots.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = _browser(p)
        try:
            phone = {"is_mobile": True, "has_touch": True} if width < 500 else {}
            page = browser.new_page(viewport={"width": width, "height": height}, **phone)
            page.goto(space)
            page.locator("#adapter-picker input").click()
            page.get_by_role("option", name="alice/support-bot-soppu").click()
            expect(page.locator("#card-summary")).to_contain_text("alice/support-bot-soppu", timeout=GUARD_MS)
            expect(page.locator("#card-summary")).to_contain_text("compression ratio")
            expect(page.locator("#card-summary")).to_contain_text(
                "shares its bases with 1 other adapter(s): cluster 0 of 1"
            )
            wait_for_plot(page)
            box = page.locator("#message textarea")
            typed = page.locator("#adapter-id textarea, #adapter-id input").first
            expect(typed).to_have_value("alice/support-bot-soppu")  # the box shows the exact id in use

            def send(text: str | None) -> None:
                """Type `text` (None: what an example put in the box) and wait for the reply to finish."""
                expect(box).to_be_enabled(timeout=GUARD_MS)  # locked while a reply streams
                if text is None:
                    text = box.input_value()
                else:
                    box.fill(text)
                box.press("Enter")
                expect(page.locator("#chat-adapter")).to_contain_text(text, timeout=GUARD_MS)
                expect(box).to_have_value("")
                expect(box).to_be_enabled(timeout=GUARD_MS)

            # an example prompt fills the box; Enter sends it
            page.locator("#examples").get_by_text("Tell me a joke.", exact=True).click()
            expect(box).to_have_value("Tell me a joke.")
            send(None)
            bot = page.locator("#chat-adapter .bot, #chat-adapter [data-testid='bot']").last
            expect(bot).not_to_be_empty(timeout=GUARD_MS)
            page.screenshot(path=str(shots / "space-chat.png"), full_page=True)
            assert (shots / "space-chat.png").stat().st_size > 10_000
            # the original adapter beside it, labelled with its repo id, the conversation starting afresh in both
            page.get_by_label("the original adapter").check()
            expect(page.locator("#chat-base")).to_be_visible()
            expect(page.locator("#chat-base")).to_contain_text("alice/support-bot", timeout=GUARD_MS)
            expect(page.locator("#chat-adapter")).not_to_contain_text("Tell me a joke.")
            send("Tell me more")
            expect(page.locator("#chat-base")).to_contain_text("Tell me more")
            expect(page.locator("#chat-base .bot, #chat-base [data-testid='bot']").last).not_to_be_empty()
            original_reply = page.locator("#chat-base .bot, #chat-base [data-testid='bot']").last.inner_text()
            assert "⚠️" not in original_reply
            page.screenshot(path=str(shots / "space-compare.png"), full_page=True)
            # a typed exact id is used as typed: alice/support-bot is not replaced by the listed alice/support-bot-soppu
            typed.fill("alice/support-bot")
            typed.press("Enter")
            label = page.locator("#chat-adapter [data-testid='block-label'], #chat-adapter label").first
            expect(label).to_have_text("alice/support-bot", timeout=GUARD_MS)
            expect(page.locator("#chat-adapter")).not_to_contain_text(
                "Tell me more", timeout=GUARD_MS
            )  # new conversation
            expect(page.locator("#chat-base")).not_to_contain_text("Tell me more")
            send("Hello!")
            assert "⚠️" not in page.locator("#chat-adapter .bot, #chat-adapter [data-testid='bot']").last.inner_text()
            picked = page.locator("#adapter-picker input")
            expect(picked).to_have_value("alice/support-bot")  # the list shows the adapter in use, typed or not
            # refresh: a fresh list, the adapter in use still selected, the conversation kept
            page.get_by_role("button", name="Refresh list").click()
            expect(picked).to_have_value("alice/support-bot")
            expect(page.locator("#chat-adapter")).to_contain_text("Hello!")
            # a typed id that does not exist, and a path: one line under the box, the adapter in use stays
            note = page.locator("#typed-note")
            for bad, words in (
                ("alice/no-such-adapter", "not a LoRA adapter repo"),
                ("/etc/passwd", "not a Hub repo id"),
            ):
                typed.fill(bad)
                typed.press("Enter")
                expect(note).to_contain_text(words, timeout=GUARD_MS)
                assert "Error" not in note.inner_text() and "hf auth" not in note.inner_text()
                expect(label).to_have_text("alice/support-bot")
                expect(picked).to_have_value("alice/support-bot")
            send("And now?")  # still talking to alice/support-bot
            assert "⚠️" not in page.locator("#chat-adapter .bot, #chat-adapter [data-testid='bot']").last.inner_text()
            page.screenshot(path=str(shots / "space-error.png"), full_page=True)
        finally:
            browser.close()


def test_browser_phone_width_stacks_the_panes(space, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shots = _artifacts(tmp_path)
    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = open_space(browser, space, {"width": 390, "height": 844}, is_mobile=True, has_touch=True)
            page.get_by_label("the original adapter").check()
            expect(page.locator("#chat-base")).to_be_visible()
            for pane in ("#chat-adapter", "#chat-base"):
                box = page.locator(pane).bounding_box()
                assert box["width"] >= 300, (pane, box)  # stacked, not two 150 px slivers
            a, b = page.locator("#chat-adapter").bounding_box(), page.locator("#chat-base").bounding_box()
            assert b["y"] >= a["y"] + a["height"] - 1  # one above the other
            assert page.evaluate("document.documentElement.scrollWidth") <= 390 + 1  # nothing off-screen sideways
            # the chat comes first at this width: the box right under the panes, the picker and card after them
            box, picker = page.locator("#message").bounding_box(), page.locator("#adapter-picker").bounding_box()
            assert box["y"] < picker["y"] and box["y"] < b["y"] + b["height"] + 200, (box, picker, b)
            message = page.locator("#message textarea")
            message.fill("Hello!")
            message.press("Enter")
            expect(page.locator("#chat-base .bot, #chat-base [data-testid='bot']").last).not_to_be_empty(
                timeout=GUARD_MS
            )
            page.screenshot(path=str(shots / "space-phone.png"), full_page=True)
        finally:
            browser.close()


@pytest.mark.parametrize("width,height", [(1280, 900), (390, 844)])
def test_browser_send_and_stop_on_view_and_replies_are_plain_text(space, backend, tmp_path, width, height):
    """At 1280x900 the Send and Stop buttons are on screen without scrolling; at both widths replies are shown as
    plain text (Markdown would turn "17. Mai 2031" into a numbered list), Stop ends a reply and frees the box, and a
    message too long for the backend is refused before it is sent."""
    import json
    import urllib.request

    from playwright.sync_api import expect, sync_playwright

    config = json.loads(urllib.request.urlopen(f"{space}/config").read())
    chats = [
        c["props"] for c in config["components"] if c.get("props", {}).get("elem_id") in ("chat-adapter", "chat-base")
    ]
    assert len(chats) == 2 and all(c.get("render_markdown") is False for c in chats)
    with sync_playwright() as p:
        browser = _browser(p)
        try:
            phone = width < 500
            extra = {"is_mobile": True, "has_touch": True} if phone else {}
            page = open_space(browser, space, {"width": width, "height": height}, **extra)
            if not phone:
                for button in ("#send", "#stop"):
                    box = page.locator(button).bounding_box()
                    assert box and box["y"] + box["height"] <= height, (button, box)
                # the error plot at the chat column's width, not squeezed into the side column
                wait_for_plot(page)
                plot, side = page.locator("#error-plot img").bounding_box(), page.locator("#side").bounding_box()
                assert plot["width"] > side["width"] + 150, (plot, side)
            message = page.locator("#message textarea")
            message.fill("Tell me a long story about the sea, please.")
            message.press("Enter")
            page.locator("#stop").click()
            expect(message).to_be_enabled(timeout=GUARD_MS)  # the box takes a message again
            page.screenshot(path=str(_artifacts(tmp_path) / f"space-{width}.png"))
            # a message the backend cannot take (prompts up to 255 tokens here: --max-total-tokens 256): one line
            # under the box naming the limit, the message kept there, nothing sent
            long = "Tell me about the sea and the ships on it. " * 60
            tokens, limit = LoraxChatClient(backend).prompt_size([{"role": "user", "content": long}])
            assert limit == 255 and tokens > limit
            message.fill(long)
            message.press("Enter")
            expect(page.locator("#message-note")).to_contain_text(f"takes at most {limit}", timeout=GUARD_MS)
            expect(message).to_have_value(long)
            assert "ships on it" not in page.locator("#chat-adapter").inner_text()
        finally:
            browser.close()
