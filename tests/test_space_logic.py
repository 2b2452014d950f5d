"""The Space's logic without Gradio or servers: ids, history, replies from a fake backend."""

import pytest

from soppu_hub.clients import ChatClient, ChatError
from soppu_hub.errors import SoppuError
from soppu_hub.space.logic import history_to_messages, stream_reply, validate_repo_id


def test_repo_id_validation_and_history_blocks():
    assert validate_repo_id(" alice/my-lora-soppu ") == "alice/my-lora-soppu"
    for bad in ["", "/etc/passwd", "../x/y", "https://example.com/a/b", "alice", "a/b/c", "~/lora"]:
        with pytest.raises(SoppuError):
            validate_repo_id(bad)
    history = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "yo"}]
    assert history_to_messages(history) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


class _Echo(ChatClient):
    """A backend that answers with the last message, word by word; or fails after the first word."""

    url, model_id = "fake://", "base"

    def __init__(self, fail: bool = False):
        self.fail, self.calls = fail, []

    def check(self) -> str:
        return self.model_id

    def _stream(self, request):
        self.calls.append(request)
        for i, word in enumerate(request.messages[-1]["content"].split()):
            if self.fail and i == 1:
                raise ChatError("the backend is overloaded right now; try again in a moment (429)")
            yield word + " "


def test_replies_accumulate_and_name_the_adapter_or_the_base():
    client = _Echo()
    assert list(stream_reply(client, "one two", [], "alice/a-soppu"))[-1] == "one two "
    assert client.calls[-1].adapter_id == "alice/a-soppu"
    list(
        stream_reply(
            client, "hi", [], "__base_model__", system_prompt="Be brief.", max_new_tokens=999, max_new_tokens_cap=8
        )
    )
    asked = client.calls[-1]
    assert asked.adapter_id is None and asked.system_prompt == "Be brief." and asked.settings.max_new_tokens == 8
    assert client.complete([{"role": "user", "content": "a b"}]) == "a b "  # the interface's own complete()


def test_failures_are_one_line_after_what_already_came():
    out = list(stream_reply(_Echo(fail=True), "one two three", [], "alice/a-soppu"))
    assert out[-1] == "one \n\n⚠️ the backend is overloaded right now; try again in a moment (429)"
    assert list(stream_reply(_Echo(), "  ", [], "alice/a-soppu")) == ["⚠️ type a message first"]
    assert list(stream_reply(_Echo(), "hi", [], "../etc"))[-1].startswith("⚠️ '../etc' is not a Hub repo id")


def test_space_options_from_the_environment(tmp_path):
    """SOPPU_EXAMPLES_FILE replaces the example prompts, SOPPU_COMPARE picks the second pane; bad values say why."""
    import pytest

    from soppu_hub.errors import SoppuError
    from soppu_hub.space.app import COMPARE_NONE, COMPARE_ORIGINAL, EXAMPLES, app_options

    assert app_options({}) == {"compare_default": COMPARE_NONE}
    (tmp_path / "ex.txt").write_text("Write 12 in French words.\n\nShout it: hello.\n")
    opts = app_options({"SOPPU_EXAMPLES_FILE": str(tmp_path / "ex.txt"), "SOPPU_COMPARE": "original"})
    assert opts == {"examples": ["Write 12 in French words.", "Shout it: hello."], "compare_default": COMPARE_ORIGINAL}
    assert EXAMPLES[0] == "Hello!"  # the generic prompts stay the default
    (tmp_path / "empty.txt").write_text("\n")
    for env, words in (
        ({"SOPPU_EXAMPLES_FILE": str(tmp_path / "empty.txt")}, "is empty"),
        ({"SOPPU_EXAMPLES_FILE": str(tmp_path / "nope.txt")}, "cannot read"),
        ({"SOPPU_COMPARE": "left"}, "is not one of nothing, original, base"),
    ):
        with pytest.raises(SoppuError, match=words):
            app_options(env)


class _Slow(_Echo):
    """Each word after a pause; adapter "slow" pauses long: a pane that waited for the other would show it."""

    def _stream(self, request):
        import time

        for word in super()._stream(request):
            time.sleep(0.2 if request.adapter_id == "alice/slow" else 0.01)
            yield word


def test_both_panes_stream_at_the_same_time():
    from soppu_hub.space.logic import stream_both

    events = list(stream_both(_Slow(), "one two three four", [([], "alice/slow"), ([], "alice/fast")]))
    finals = {i: t for i, t in events}
    assert finals == {0: "one two three four ", 1: "one two three four "}
    fast_done = max(n for n, (i, _) in enumerate(events) if i == 1)
    slow_done = max(n for n, (i, _) in enumerate(events) if i == 0)
    assert fast_done < slow_done  # the fast pane finished while the slow one still streamed
    assert [t for i, t in events if i == 0] == list(stream_reply(_Echo(), "one two three four", [], "alice/slow"))


def test_a_typed_id_must_be_a_lora_repo(hub):
    from soppu_hub.space.logic import check_adapter_repo

    # the session's offline Hub (HF_ENDPOINT points at it)
    assert check_adapter_repo(" alice/support-bot ") == "alice/support-bot"
    for bad, words in (
        ("alice/no-such-adapter", "not a LoRA adapter repo"),
        (hub.base_model, "not a LoRA adapter repo"),  # a full model: no adapter_config.json
        ("../etc", "is not a Hub repo id"),
    ):
        with pytest.raises(SoppuError, match=words):
            check_adapter_repo(bad)


class _Sized(_Echo):
    """A backend that says how long a prompt is: one token per word of the conversation, at most 50."""

    def prompt_size(self, messages, system_prompt=None):
        return sum(len(m["content"].split()) for m in messages), 50


def test_a_message_too_long_is_refused_and_a_long_one_confirmed_before_it_goes():
    from soppu_hub.space import logic
    from soppu_hub.space.logic import length_check

    client = _Sized()
    ok, note = length_check(client, "word " * 60, [])
    assert not ok and "60 tokens" in note and "at most 50" in note and "\n" not in note
    old, logic.LONG_PROMPT = logic.LONG_PROMPT, 20
    try:
        ok, note = length_check(client, "word " * 30, [])
        assert not ok and "Send it again" in note
        assert length_check(client, "word " * 30, [], confirmed=True) == (True, "")
        assert length_check(client, "hi", [{"role": "user", "content": "word " * 10}]) == (True, "")
    finally:
        logic.LONG_PROMPT = old
    assert length_check(_Echo(), "word " * 10_000, []) == (True, "")  # a backend that cannot say: the request will


class _Stuck(_Echo):
    """A backend whose first token takes long (a long prompt on a CPU backend); it counts the streams left open."""

    def __init__(self):
        super().__init__()
        self.open = 0

    def _stream(self, request):
        import time

        self.open += 1
        try:
            time.sleep(5.0)
            yield from super()._stream(request)
        finally:
            self.open -= 1


def test_stop_ends_both_panes_at_once_even_before_the_first_token():
    """Stop while the backend has not answered yet: the reply ends within a few checks (not when the backend
    speaks), and each pane closes its stream at its next token, so the backend's slot is freed."""
    import threading
    import time

    from soppu_hub.space.logic import stream_both

    client, stop = _Stuck(), threading.Event()
    threading.Timer(0.2, stop.set).start()
    start = time.monotonic()
    events = list(stream_both(client, "one two three", [([], "alice/a"), ([], "alice/b")], stop=stop))
    assert time.monotonic() - start < 0.2 + 3.0  # Stop at 0.2 s, seen within a few checks: not after 5 s
    assert all(text == "" for _, text in events)  # only the empty start of each reply came before Stop
    deadline = time.monotonic() + 30
    while client.open and time.monotonic() < deadline:  # the panes leave at the backend's first token
        time.sleep(0.05)
    assert client.open == 0
