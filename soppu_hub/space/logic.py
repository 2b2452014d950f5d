"""What the Space does, without Gradio: find adapters, summarise their cards, stream chat replies.

`app.py` beside it only lays out widgets and wires them to these functions.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from ..clients import APIS, ChatClient, ChatError, GenerationSettings, connect
from ..errors import SoppuError
from ..hub.common import is_repo_id
from ..hub.info import card_metadata, fetch_file, list_tagged
from ..peft_format.layout import BASE_MODEL_ID, ERRORS_PNG, TAG

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded backend's base without SOPPU_BASE_MODEL


def validate_repo_id(text: str | None) -> str:
    """A Hub model id `owner/name`; local paths and URLs are refused (the Space serves Hub adapters only)."""
    text = (text or "").strip()
    if not text:
        raise SoppuError("pick an adapter or type its repo id (owner/name)")
    if "://" in text or text.startswith(("/", ".", "~")) or "\\" in text or ".." in text:
        raise SoppuError(f"{text!r} is not a Hub repo id: use owner/name, not a path or URL")
    if not is_repo_id(text):
        raise SoppuError(f"{text!r} is not a Hub repo id: use owner/name (letters, digits, - _ .)")
    return text


def list_soppu_adapters(author: str | None = None, *, token: str | None = None, limit: int = 200) -> list[str]:
    """Repo ids tagged `soppu` on the Hub (optionally one author's); when the Hub cannot be listed a SoppuError
    says so and the picker still accepts typed ids."""
    return list_tagged(TAG, author=author, token=token, limit=limit)


def list_collection_members(collection: str, *, token: str | None = None) -> list[str]:
    """The pushed members of a soppu collection (cluster by cluster, in the order they came in); a collection that
    cannot be read is a SoppuError, and the picker still accepts typed ids."""
    from ..collection.remote import open_collection

    return [m.repo_id for m in open_collection(collection, token=token).members if m.repo_id]


@dataclass
class CardSummary:
    repo_id: str
    base_model: str | None
    compression_ratio: float | None
    mean_rel_error: float | None
    max_rel_error: float | None
    error_plot: str | None  # local file path of the card's error plot
    cluster: int | None = None
    cluster_size: int | None = None
    clusters: int | None = None
    sources: list[str] | None = None  # the original adapter(s) this one was compressed from

    @property
    def original(self) -> str | None:
        """The original adapter's Hub id, when the card names exactly one that is a repo id."""
        if not self.sources or len(self.sources) != 1:
            return None
        try:
            return validate_repo_id(self.sources[0])
        except SoppuError:
            return None  # compressed from a local folder: nothing on the Hub to compare with

    def markdown(self) -> str:
        def fmt(v, spec):
            return format(v, spec) if isinstance(v, (int, float)) else "n/a"

        return (
            f"**{self.repo_id}**  \nbase model: `{self.base_model or 'unknown'}`  \n"
            f"compression ratio: **{fmt(self.compression_ratio, '.2f')}x**  \n"
            f"relative error: mean **{fmt(self.mean_rel_error, '.4f')}**, max **{fmt(self.max_rel_error, '.4f')}**"
            + (
                f"  \nshares its bases with **{self.cluster_size - 1}** other adapter(s): cluster {self.cluster} "
                f"of {self.clusters}"
                if self.cluster_size
                else ""
            )
        )


def card_summary(repo_id: str, *, token: str | None = None) -> CardSummary:
    """Read the adapter's card metadata (written by soppu-hub) and fetch its error plot."""
    repo_id = validate_repo_id(repo_id)
    data = card_metadata(repo_id, token=token)
    soppu = data.get("soppu") or {}
    path = fetch_file(repo_id, ERRORS_PNG, token=token)
    plot = str(path) if path else None
    return CardSummary(
        repo_id,
        data.get("base_model"),
        soppu.get("compression_ratio"),
        soppu.get("mean_rel_error"),
        soppu.get("max_rel_error"),
        plot,
        soppu.get("cluster"),
        soppu.get("cluster_size"),
        soppu.get("clusters"),
        soppu.get("sources"),
    )


def check_adapter_repo(repo_id: str | None, *, token: str | None = None) -> str:
    """A typed id the Space can chat with: a valid repo id whose adapter_config.json says LoRA; else a SoppuError
    in one line (the caller keeps the adapter it had)."""
    import json

    repo_id = validate_repo_id(repo_id)
    path = fetch_file(repo_id, "adapter_config.json", token=token)
    if path is None:
        raise SoppuError(f"{repo_id} has no adapter_config.json here: not a LoRA adapter repo (or not visible to us)")
    try:
        peft_type = str(json.loads(path.read_text()).get("peft_type", "")).upper()
    except (OSError, ValueError, AttributeError):
        peft_type = "?"
    if peft_type != "LORA":
        raise SoppuError(f"{repo_id} is not a LoRA adapter (peft_type {peft_type}); pick a LoRA repo")
    return repo_id


STOP_CHECK_S = 0.2  # how often a reply waiting on the backend looks whether Stop was pressed
LONG_PROMPT = 1000  # tokens: on a CPU backend the first words of a reply then take tens of seconds, or minutes


def length_check(
    client: ChatClient, message: str, history: list | None, system_prompt: str | None = None, *, confirmed: bool = False
) -> tuple[bool, str]:
    """(send it?, a line for the person) before a message goes out: one too long for the backend is refused, naming
    its limit; a long one is sent only once confirmed (sent again), so a minute of silence is not a surprise."""
    size = client.prompt_size(history_to_messages(history) + [{"role": "user", "content": message}], system_prompt)
    if size is None:
        return True, ""
    tokens, limit = size
    if tokens > limit:
        return False, (
            f"⚠️ this message makes a prompt of {tokens:,} tokens with the conversation; the backend takes at most "
            f"{limit:,}: shorten it or clear the chat"
        )
    if tokens > LONG_PROMPT and not confirmed:
        return False, (
            f"⏳ a long message ({tokens:,} tokens with the conversation): on a CPU backend the reply may take a "
            "minute or more to start. Send it again to send it anyway."
        )
    return True, ""


def stream_both(
    client: ChatClient,
    message: str,
    runs: list[tuple[list | None, str | None]],
    *,
    stop: threading.Event | None = None,
    **kw,
) -> Iterator[tuple[int, str]]:
    """(which run, its reply so far) as tokens arrive, the runs (history, adapter id) streaming at the same time:
    the compare pane does not wait for the first to finish. Each run is stream_reply (errors one line). `stop` set:
    it returns within STOP_CHECK_S, whatever the backend is doing, and each run leaves its stream (closing the
    connection, which frees the backend's slot) at its next token."""
    import queue

    done = object()
    out: queue.Queue = queue.Queue()
    stop = stop or threading.Event()

    def run(i: int, history, adapter_id) -> None:
        replies = stream_reply(client, message, history, adapter_id, **kw)
        try:
            for text in replies:
                if stop.is_set():
                    return
                out.put((i, text))
        finally:
            replies.close()  # a stopped reply's HTTP stream closes now: the backend cancels it
            out.put((i, done))

    for i, (history, adapter_id) in enumerate(runs):
        threading.Thread(target=run, args=(i, history, adapter_id), daemon=True, name=f"space-pane-{i}").start()
    left = len(runs)
    while left and not stop.is_set():
        try:
            i, text = out.get(timeout=STOP_CHECK_S)
        except queue.Empty:
            continue
        if text is done:
            left -= 1
        else:
            yield i, text


def history_to_messages(history: list | None) -> list[dict]:
    """Gradio 6 chat history (content as a string or as content blocks) -> plain role/content messages."""
    out = []
    for m in history or []:
        role, content = (
            (m.get("role"), m.get("content"))
            if isinstance(m, dict)
            else (getattr(m, "role", None), getattr(m, "content", None))
        )
        if isinstance(content, list):
            content = "".join(
                b.get("text", "") for b in content if isinstance(b, dict) and b.get("type", "text") == "text"
            )
        if role in ("user", "assistant", "system") and isinstance(content, str):
            out.append({"role": role, "content": content})
    return out


def stream_reply(
    client: ChatClient,
    message: str,
    history: list | None,
    adapter_id: str | None,
    *,
    system_prompt: str | None = None,
    temperature: float = 0.0,
    max_new_tokens: int = 64,
    max_new_tokens_cap: int = 256,
) -> Iterator[str]:
    """Yield the reply so far (cumulative) as tokens arrive; errors become one readable line in the chat."""
    if not isinstance(message, str) or not message.strip():
        yield "⚠️ type a message first"
        return
    messages = history_to_messages(history) + [{"role": "user", "content": message}]
    settings = GenerationSettings(
        max_new_tokens=max(1, min(int(max_new_tokens), max_new_tokens_cap)), temperature=temperature or None
    )
    text = ""
    try:
        adapter = validate_repo_id(adapter_id) if adapter_id and adapter_id.strip() != BASE_MODEL_ID else None
        yield text
        for piece in client.stream(messages, adapter, system_prompt=system_prompt or None, settings=settings):
            text += piece
            yield text
    except (ChatError, SoppuError) as e:
        yield (text + "\n\n" if text else "") + f"⚠️ {e}"


@dataclass
class Backend:
    url: str
    auth_token: str | None
    child: object | None  # launch.Child when we started the embedded backend
    api: str = "lorax"  # or "openai": /v1/chat/completions with the adapter id as model (vLLM)

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    def client(self) -> ChatClient:
        return connect(self.url, api=self.api, auth_token=self.auth_token)


def backend_from_env() -> Backend:
    """LORAX_URL (+ LORAX_API_TOKEN, BACKEND_API=lorax|openai) when set; otherwise start the embedded backend
    for SOPPU_BASE_MODEL (it speaks both APIs)."""
    api = os.environ.get("BACKEND_API") or "lorax"
    if api not in APIS:
        raise SoppuError(
            f"BACKEND_API={api!r} is not one of {', '.join(APIS)}: lorax for LoRAX or soppu-hub serve, "
            "openai for vLLM or another OpenAI-compatible server"
        )
    url = os.environ.get("LORAX_URL")
    if url:
        return Backend(url.rstrip("/"), os.environ.get("LORAX_API_TOKEN") or None, None, api)
    from ..launch import start_backend

    child = start_backend(os.environ.get("SOPPU_BASE_MODEL", DEFAULT_BASE_MODEL))
    return Backend(child.url, None, child, api)
