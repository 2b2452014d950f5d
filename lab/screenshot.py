"""docs/space.png and docs/space-phone.png, the demo page's screenshots: a person on the demo's Space, in headless
Chromium, one adapter beside its original, at 1300x900 and on a phone (390x844).

`make screenshot` (`python -m lab.screenshot [PNG]`) runs the real demo and keeps both (the phone's beside the PNG
named, with -phone); the demo test drives the tiny demo through the same `look_at_the_space`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"  # Debian's chromium (make browser installs it)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BOTS = "#chat-{0} .bot, #chat-{0} [data-testid='bot']"


def launch_browser(playwright):
    if not Path(CHROMIUM).exists():
        raise RuntimeError("the browser needs Debian's chromium (apt-get install chromium); make browser installs it")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)


def open_space(browser, url: str, viewport: dict, *, timeout_ms: int = 180_000, **context):
    """A page on the Space at this size, once its first card is shown (typing earlier is undone by the page's load)."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport=viewport, **context)
    page.goto(url)
    expect(page.locator("#card-summary")).to_contain_text("compression ratio", timeout=timeout_ms)
    return page


def wait_for_plot(page, timeout_ms: int = 180_000) -> None:
    """Until the card's error plot has loaded (an image with pixels, not the placeholder)."""
    page.wait_for_function(
        "() => { const i = document.querySelector('#error-plot img'); return i && i.complete && i.naturalWidth > 0 }",
        timeout=timeout_ms,
    )


PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}


def look_at_the_space(
    url: str, adapter: str, example: str, shot: Path, *, timeout_ms: int = 120_000, device: dict | None = None
) -> dict[str, str]:
    """Type `adapter`'s id, compare with its original, click the example prompt, send it; screenshot to `shot`
    (`device`: the page's viewport and context, e.g. PHONE; default a 1300x900 desktop). Returns the last reply in
    each pane ({"adapter": ..., "base": ...})."""
    from playwright.sync_api import expect, sync_playwright

    seen = {}
    with sync_playwright() as p:
        browser = launch_browser(p)
        try:
            # the page's own first card (the list's first adapter) before typing: typed earlier, the box is reset
            # to the list's value when the page finishes loading, and the screenshot names the wrong adapter
            context = dict(device or {"viewport": {"width": 1300, "height": 900}})
            page = open_space(browser, url, context.pop("viewport"), **context)
            typed = page.locator("#adapter-id textarea, #adapter-id input").first
            typed.fill(adapter)
            typed.press("Enter")
            expect(page.locator("#card-summary")).to_contain_text(adapter, timeout=60_000)
            page.get_by_label("the original adapter").check()
            expect(page.locator("#chat-base")).to_contain_text(adapter.removesuffix("-soppu"), timeout=10_000)
            # Gradio shows long examples cut short ("...treasur..."): click the one that starts like ours
            page.locator("#examples").get_by_text(example[:40], exact=len(example) <= 40).first.click()
            expect(page.locator("#message textarea")).to_have_value(example)
            page.locator("#message textarea").press("Enter")
            for pane in ("adapter", "base"):
                expect(page.locator(BOTS.format(pane)).last).not_to_be_empty(timeout=timeout_ms)
            expect(page.locator("#message textarea")).to_be_enabled(timeout=timeout_ms)
            for pane in ("adapter", "base"):
                seen[pane] = page.locator(BOTS.format(pane)).last.inner_text()
            shot.parent.mkdir(parents=True, exist_ok=True)
            if device is None:  # clicking an example low in a long list scrolled the chats away
                page.evaluate("window.scrollTo(0, 0)")
            else:  # a phone: the replies and the box under them, where a person's thumb is
                page.locator("#message").scroll_into_view_if_needed()
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    return seen


def main(argv: list[str] | None = None) -> int:
    """The real demo, one adapter of each kind a person recognises (the pirate when it is trained), screenshot."""
    from lab.demo import run_demo
    from lab.demo_sets import real_set

    shot = Path((argv or sys.argv[1:] or ["docs/space.png"])[0])
    demo_set = real_set()
    names = [a.name for a in demo_set.adapters]
    name = "pirate" if "pirate" in names else names[0]
    seen: dict[str, str] = {}
    phone = shot.with_name(f"{shot.stem}-phone{shot.suffix}")
    example = demo_set.examples[names.index(name)]

    def look(run) -> None:
        seen.update(look_at_the_space(run.space_url, f"alice/{name}-soppu", example, shot))
        look_at_the_space(run.space_url, f"alice/{name}-soppu", example, phone, device=PHONE)

    with tempfile.TemporaryDirectory(prefix="soppu-screenshot-") as tmp:
        run_demo(Path(tmp) / "demo", demo_set=demo_set, serve=False, background_checks=False, on_ready=look)
    print(
        f"{shot} and {phone}: alice/{name}-soppu said {seen.get('adapter')!r}; its original said {seen.get('base')!r}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
