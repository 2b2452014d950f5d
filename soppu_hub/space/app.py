"""soppu-hub Space: pick a soppu-compressed LoRA adapter and chat with it through a LoRAX backend.

The Gradio layout and wiring over soppu_hub.space.logic. Backend: LORAX_URL (+ LORAX_API_TOKEN; BACKEND_API=openai
for vLLM's OpenAI-compatible server, the adapter id sent as the model) or, when unset, the embedded CPU backend
started here. SOPPU_AUTHOR filters the adapter list; SOPPU_COLLECTION (owner/name) lists that collection's members
instead; SOPPU_ADAPTER is the adapter the page opens on; SOPPU_MAX_NEW_TOKENS caps replies; SOPPU_EXAMPLES_FILE (one
prompt a line) replaces the example prompts; SOPPU_COMPARE (nothing, original or base) sets what the second pane
shows. Runs with `python space/app.py` or `python -m soppu_hub.space.app` (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
honoured, as on Spaces).
"""

from __future__ import annotations

import atexit
import os
import threading
import warnings
from collections.abc import Iterator

import gradio as gr

from ..clients import ChatClient
from ..errors import SoppuError
from .logic import (
    backend_from_env,
    card_summary,
    check_adapter_repo,
    length_check,
    list_collection_members,
    list_soppu_adapters,
    stream_both,
    stream_reply,
)

# Gradio's queue route builds a dict with Starlette's deprecated HTTP_422 name on every request: one warning per
# message, dozens a minute, none of them ours to fix (the cause is in gradio/routes.py).
warnings.filterwarnings("ignore", message="'HTTP_422_UNPROCESSABLE_ENTITY' is deprecated")

COMPARE_NONE, COMPARE_ORIGINAL, COMPARE_BASE = "nothing", "the original adapter", "the base model"
# Card reads run one at a time, in the order asked: a slow first card (page load) finishing after the card of an
# adapter picked meanwhile would otherwise overwrite it with the wrong adapter's summary.
ONE_CARD_AT_A_TIME = {"concurrency_limit": 1, "concurrency_id": "card"}
STOPS: dict[str, threading.Event] = {}  # per browser session: Stop pressed while its reply streams
MAX_NEW_TOKENS = int(os.environ.get("SOPPU_MAX_NEW_TOKENS", "256"))
# one set of defaults for the UI's controls and the `chat` API
DEFAULT_TEMPERATURE = 0.0
DEFAULT_MAX_NEW = min(64, MAX_NEW_TOKENS)
EXAMPLES = [
    "Hello!",
    "Where is my order? It has not arrived.",
    "Tell me a joke.",
    "What is the capital of France?",
    "How do I reset my password?",
    "I am feeling sad.",
]
COMPARE_CHOICES = {"nothing": COMPARE_NONE, "original": COMPARE_ORIGINAL, "base": COMPARE_BASE}
AUTHOR = os.environ.get("SOPPU_AUTHOR") or None
COLLECTION = os.environ.get("SOPPU_COLLECTION") or None
# At phone width the row stacks its columns: the chat first (panes, box, buttons), the picker and card after it, so
# the box is near the replies instead of two screens down.
CSS = """@media (max-width: 760px) { #chat-column { order: -1; } }"""
INTRO = """# Chat with a compressed LoRA adapter
Adapters compressed with soppu-hub (joint diagonalization: one shared
basis, a small core per adapter), served by a LoRAX backend. Pick one from the list or type its exact repo id."""


def build_app(
    client: ChatClient,
    *,
    examples: list[str] = EXAMPLES,
    compare_default: str = COMPARE_NONE,
    first_adapter: str | None = None,
) -> gr.Blocks:
    def adapters() -> list[str]:
        try:
            return list_collection_members(COLLECTION) if COLLECTION else list_soppu_adapters(AUTHOR)
        except SoppuError:
            return []

    def show_card(repo_id: str):
        """The card summary, the plot, and the original adapter to compare with (None when there is none)."""
        try:
            s = card_summary(repo_id)
        except SoppuError as e:
            return f"⚠️ {e}", None, None
        return s.markdown(), s.error_plot, s.original

    def compared_id(compare: str, original: str | None) -> str | None | bool:
        """What the second pane talks to: the original adapter, the base model (None), or nothing (False)."""
        if compare == COMPARE_ORIGINAL:
            return original or False
        return None if compare == COMPARE_BASE else False

    def labels(adapter_id, compare, original):
        """Each pane labelled with what it talks to; the second shown only when comparing."""
        other = compared_id(compare, original)
        label = "base model" if other is None else (other or "the original adapter is not on the Hub")
        return (
            gr.update(label=adapter_id or "adapter"),
            gr.update(visible=True if compare != COMPARE_NONE else "hidden", label=label),
        )

    def panes(adapter_id, compare, original):
        """A new conversation in both panes (in step), labelled."""
        first, second = labels(adapter_id, compare, original)
        return {**first, "value": []}, {**second, "value": []}

    def cleared(adapter_id):
        """First thing on a new adapter, before the (slower) card is read, so a message sent meanwhile stays."""
        return gr.update(value=[], label=adapter_id or "adapter"), gr.update(value=[])

    def listed(current: str | None) -> list[str]:
        """The Hub's list, with the adapter in use on it even when the list does not hold it (a typed id)."""
        choices = adapters()
        return choices + [current] if current and current not in choices else choices

    def refresh(current):
        """A fresh list; the adapter in use stays selected (and the chats stay)."""
        return gr.update(choices=listed(current), value=current)

    def pick_typed(text, current):
        """Enter in the id box: a LoRA repo becomes the adapter in use and the picker shows it; anything else is
        one line under the box, and the adapter in use stays."""
        try:
            repo_id = check_adapter_repo(text)
        except SoppuError as e:
            return current, gr.update(), f"⚠️ {e}"
        return repo_id, gr.update(choices=listed(repo_id), value=repo_id), ""

    def respond(
        message,
        history,
        base_history,
        adapter_id,
        system,
        temperature,
        max_new,
        compare,
        original,
        warned,
        request: gr.Request,
    ):
        stop = STOPS.setdefault(request.session_hash, threading.Event())
        stop.clear()
        if not (message or "").strip():
            yield "", history, base_history, "", None
            return
        ok, note = length_check(client, message, history, system, confirmed=message == warned)
        if not ok:  # the message stays in the box; a long one goes out when sent again
            yield gr.skip(), history, base_history, note, message
            return
        other = compared_id(compare, original)
        compare = other is not False
        past, base_past = list(history or []), list(base_history or [])
        history = past + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        if compare:
            base_history = base_past + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        kw = dict(
            system_prompt=system, temperature=temperature, max_new_tokens=max_new, max_new_tokens_cap=MAX_NEW_TOKENS
        )
        # the box is cleared and locked while the reply streams, so no message is typed into a busy chat; Stop
        # unlocks it
        yield gr.update(value="", interactive=False), history, base_history, "", None
        runs = [(past, adapter_id)] + ([(base_past, other)] if compare else [])
        for i, text in stream_both(client, message, runs, stop=stop, **kw):  # both panes at once
            (history if i == 0 else base_history)[-1] = {"role": "assistant", "content": text}
            yield gr.skip(), history, base_history, gr.skip(), gr.skip()
        # value too: fast yields may be coalesced
        yield gr.update(value="", interactive=True), history, base_history, gr.skip(), gr.skip()

    def chat(
        message: str,
        history: list[dict],
        adapter_id: str,
        system_prompt: str = "",
        temperature: float = DEFAULT_TEMPERATURE,
        max_new_tokens: int = DEFAULT_MAX_NEW,
    ) -> Iterator[str]:
        """Stream the reply of `adapter_id` (or __base_model__) to `message` given the chat `history`
        (role/content messages); the defaults are the UI's."""
        yield from stream_reply(
            client,
            message,
            history,
            adapter_id,
            system_prompt=system_prompt,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            max_new_tokens_cap=MAX_NEW_TOKENS,
        )

    with gr.Blocks(title="soppu-hub: chat with a compressed LoRA") as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1, min_width=320, elem_id="side"):
                choices = adapters()
                first = first_adapter or (choices[0] if choices else None)
                choices = choices + [first] if first and first not in choices else choices
                # a list to pick from and a box for an exact id: a dropdown that accepts typing would replace a
                # typed id with the first listed id it prefixes (alice/support-bot -> alice/support-bot-soppu)
                picker = gr.Dropdown(choices=choices, value=first, label="Adapter", elem_id="adapter-picker")
                typed = gr.Textbox(
                    value=first,
                    label="or type an exact repo id, then Enter",
                    elem_id="adapter-id",
                    placeholder="owner/name",
                    max_lines=1,
                )
                typed_note = gr.Markdown(elem_id="typed-note")
                active = gr.State(first)
                refresh_btn = gr.Button("Refresh list", size="sm")
                summary = gr.Markdown(elem_id="card-summary")
                with gr.Accordion("Generation settings", open=False):  # closed: on a phone the chat comes sooner
                    system = gr.Textbox(label="System prompt", lines=2)
                    temperature = gr.Slider(
                        0.0, 2.0, value=DEFAULT_TEMPERATURE, step=0.05, label="Temperature (0 = greedy)"
                    )
                    max_new = gr.Slider(1, MAX_NEW_TOKENS, value=DEFAULT_MAX_NEW, step=1, label="Max new tokens")
                compare = gr.Radio(
                    [COMPARE_NONE, COMPARE_ORIGINAL, COMPARE_BASE],
                    value=compare_default,
                    label="Compare side by side with",
                    elem_id="compare",
                )
                original = gr.State(None)
            with gr.Column(scale=2, elem_id="chat-column"):
                with gr.Row():  # min_width: on a phone the panes stack instead of shrinking to slivers
                    # replies as plain text: an answer is literal ("17. Mai 2031" is a date, not a numbered list)
                    chatbot = gr.Chatbot(
                        label="Adapter", height=440, elem_id="chat-adapter", min_width=300, render_markdown=False
                    )
                    base_chat = gr.Chatbot(
                        label="compared with",
                        height=440,
                        elem_id="chat-base",
                        visible=True if compare_default != COMPARE_NONE else "hidden",
                        min_width=300,
                        render_markdown=False,
                    )
                message = gr.Textbox(label="Message", placeholder="Type a message and press Enter", elem_id="message")
                message_note = gr.Markdown(elem_id="message-note")  # a message too long, or long: before sending
                warned = gr.State(None)  # the long message the note asked to confirm
                with gr.Row():  # right under the box: on view without scrolling, whatever the examples
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")
                gr.Examples(
                    [[e] for e in examples],
                    inputs=message,
                    label="Example prompts (click one, then Enter)",
                    elem_id="examples",
                    examples_per_page=max(1, len(examples)),
                )  # one task each: all on view
                # the adapter's error plot at the chat column's width: in the side column a real model's figure
                # (30 layers x 7 module types) shrank to 400 px and could not be read without expanding it
                plot = gr.Image(
                    label="Relative error by layer",
                    show_label=False,
                    type="filepath",
                    interactive=False,
                    elem_id="error-plot",
                )  # the badge would cover the figure's own title

        # a new adapter or a new comparison starts a new conversation: both panes cleared, in step, labelled
        picker.change(lambda v: (v, v), picker, [active, typed], api_visibility="private")
        typed.submit(pick_typed, [typed, active], [active, picker, typed_note], api_visibility="private")
        active.change(cleared, active, [chatbot, base_chat], api_visibility="private").then(
            show_card, active, [summary, plot, original], api_visibility="private", **ONE_CARD_AT_A_TIME
        ).then(labels, [active, compare, original], [chatbot, base_chat], api_visibility="private")
        demo.load(show_card, active, [summary, plot, original], api_visibility="private", **ONE_CARD_AT_A_TIME).then(
            labels, [active, compare, original], [chatbot, base_chat], api_visibility="private"
        )
        refresh_btn.click(refresh, active, picker, api_visibility="private")
        compare.change(panes, [active, compare, original], [chatbot, base_chat], api_visibility="private")
        inputs = [message, chatbot, base_chat, active, system, temperature, max_new, compare, original, warned]
        outputs = [message, chatbot, base_chat, message_note, warned]
        # always_last: a message sent while the previous reply is finishing runs right after it, never dropped
        message.submit(respond, inputs, outputs, api_visibility="private", trigger_mode="always_last")
        send.click(respond, inputs, outputs, api_visibility="private", trigger_mode="always_last")

        # Stop: the streams end where they are (the reply so far stays) and the box takes a message again. A flag
        # the reply looks at, not Gradio's `cancels`: a cancelled event sometimes never completed in the page, and
        # the next message, queued behind it (always_last), was then never sent
        def stop_reply(request: gr.Request):
            STOPS.setdefault(request.session_hash, threading.Event()).set()
            return gr.update(interactive=True)

        stop.click(stop_reply, None, message, api_visibility="private")
        clear.click(lambda: ([], []), None, [chatbot, base_chat], api_visibility="private")
        gr.api(chat, api_name="chat")
    return demo


def app_options(env) -> dict:
    """build_app's keywords from SOPPU_EXAMPLES_FILE, SOPPU_ADAPTER (the adapter the page opens on) and
    SOPPU_COMPARE."""
    options: dict = {}
    if env.get("SOPPU_EXAMPLES_FILE"):
        path = env["SOPPU_EXAMPLES_FILE"]
        try:
            options["examples"] = [line for line in open(path, encoding="utf-8").read().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise SoppuError(
                f"cannot read SOPPU_EXAMPLES_FILE {path} ({type(e).__name__}); give a text file, one prompt a line"
            ) from None
        if not options["examples"]:
            raise SoppuError(f"SOPPU_EXAMPLES_FILE {path} is empty; give one prompt a line")
    if env.get("SOPPU_ADAPTER"):
        options["first_adapter"] = env["SOPPU_ADAPTER"].strip()
    compare = env.get("SOPPU_COMPARE", "nothing")
    if compare not in COMPARE_CHOICES:
        raise SoppuError(f"SOPPU_COMPARE={compare!r} is not one of {', '.join(COMPARE_CHOICES)}")
    options["compare_default"] = COMPARE_CHOICES[compare]
    return options


def main() -> None:
    try:
        backend = backend_from_env()
    except SoppuError as e:  # a misconfigured Space says what to set, in one line
        raise SystemExit(f"error: {e}") from None
    atexit.register(backend.stop)
    client = backend.client()
    try:
        options = app_options(os.environ)
    except SoppuError as e:
        raise SystemExit(f"error: {e}") from None
    build_app(client, **options).queue(default_concurrency_limit=16).launch(theme=gr.themes.Soft(), css=CSS)


if __name__ == "__main__":
    main()
