"""Reliability matrix, backend rows: bad requests, hostile adapter ids, load, and clients that vanish, all over real
HTTP against `soppu-hub serve` processes on loopback. Every bad request must be a 422 with LoRAX's error shape (never
a 500), leave no slot taken, and the server must go on answering correctly."""

import asyncio
import http.client
import json
import socket
import time
import urllib.request
from urllib.parse import urlsplit

import pytest
from lorax import AsyncClient, Client

pytestmark = pytest.mark.e2e  # real servers over loopback

PROMPT = "Hello! How are you today?"
ADAPTERS = ["alice/support-bot-soppu", "alice/pirate-talk-soppu", None, "support-bot"]  # 2 Hub, base, 1 local
SOURCES = {"support-bot": "local"}


def post(url: str, path: str, body: bytes, timeout: float = 120) -> tuple[int, dict]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    status, text = r.status, r.read()
    conn.close()
    return status, json.loads(text) if text else {}


def info(url: str) -> dict:
    return json.loads(urllib.request.urlopen(f"{url}/info", timeout=30).read())


def gen(inputs, **params) -> bytes:
    return json.dumps({"inputs": inputs, "parameters": params}).encode()


BAD_REQUESTS = {
    "not JSON": (b"{nope", "not valid JSON"),
    "not UTF-8": (b"\xff\xfe\x00", "not valid JSON"),
    "JSON but a list": (b"[1, 2]", "must be a JSON object"),
    "no inputs": (b"{}", "`inputs` must be a non-empty string"),
    "empty inputs": (gen(""), "`inputs` must be a non-empty string"),
    "inputs a number": (json.dumps({"inputs": 5}).encode(), "`inputs` must be a non-empty string"),
    "parameters a string": (
        json.dumps({"inputs": "hi", "parameters": "x"}).encode(),
        "`parameters` must be a JSON object",
    ),
    "max_new_tokens 0": (gen("hi", max_new_tokens=0), "`max_new_tokens` must be strictly positive"),
    "max_new_tokens negative": (gen("hi", max_new_tokens=-5), "`max_new_tokens` must be strictly positive"),
    "max_new_tokens huge": (gen("hi", max_new_tokens=10**12), "`max_new_tokens` must be <= 256"),
    "max_new_tokens 1.5": (gen("hi", max_new_tokens=1.5), "`max_new_tokens` must be strictly positive"),
    "max_new_tokens a string": (gen("hi", max_new_tokens="5"), "`max_new_tokens` must be strictly positive"),
    "max_new_tokens true": (gen("hi", max_new_tokens=True), "`max_new_tokens` must be strictly positive"),
    "temperature negative": (gen("hi", temperature=-1.0), "`temperature` must be a number >= 0"),
    "temperature a string": (gen("hi", temperature="hot"), "`temperature` must be a number >= 0"),
    "temperature NaN": (b'{"inputs": "hi", "parameters": {"temperature": NaN}}', "`temperature` must be a number >= 0"),
    "top_p 0": (gen("hi", top_p=0), "`top_p` must be in (0, 1]"),
    "top_p 1.5": (gen("hi", top_p=1.5), "`top_p` must be in (0, 1]"),
    "top_k 0": (gen("hi", top_k=0), "`top_k` must be a positive integer"),
    "repetition_penalty 0": (gen("hi", repetition_penalty=0), "`repetition_penalty` must be a number > 0"),
    "seed negative": (gen("hi", seed=-1, do_sample=True), "`seed` must be an integer >= 0"),
    "truncate a string": (gen("hi", truncate="x"), "`truncate` must be a positive integer"),
    "stop a string": (gen("hi", stop="abc"), "`stop` must be a list of strings"),
    "stop with a number": (gen("hi", stop=[1]), "`stop` must be a list of strings"),
    "five stop sequences": (gen("hi", stop=["a", "b", "c", "d", "e"]), "up to 4 stop sequences"),
    "best_of 2": (gen("hi", best_of=2), "`best_of` > 1 is not supported"),
    "50,000-character prompt": (gen("hello " * 8334), "`inputs` must have less than 256 tokens"),
    "adapter_id a number": (gen("hi", adapter_id=5), "`adapter_id` must be a string"),
    "adapter_source s3": (gen("hi", adapter_id="a/b", adapter_source="s3"), "adapter_source 's3' is not supported"),
    "Hub id that is a path": (gen("hi", adapter_id="../../etc/passwd"), "is not a Hub repo id"),
    "local ../": (gen("hi", adapter_id="../outside", adapter_source="local"), "outside the allowed directory"),
    "local absolute": (gen("hi", adapter_id="/etc", adapter_source="local"), "outside the allowed directory"),
    "local with a NUL byte": (gen("hi", adapter_id="a\x00b", adapter_source="local"), "is not a valid path"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_422_with_lorax_error_shape(backend, case):
    body, expected = BAD_REQUESTS[case]
    for path in ("/generate", "/generate_stream"):
        status, out = post(backend, path, body)
        assert status == 422 and out["error_type"] == "validation" and expected in out["error"], (path, status, out)


def test_local_adapters_outside_the_folder_are_refused_even_through_a_symlink(backend, local_adapters, tmp_path):
    from lab.samples import write_sample_adapters

    outside = write_sample_adapters(tmp_path / "outside", base_model="soppu-samples/tiny-llama")[0]  # a valid adapter
    link = local_adapters / "link-out"
    link.symlink_to(outside, target_is_directory=True)
    try:
        for adapter_id in (str(outside), "link-out", str(link), "support-bot/../../outside"):
            status, out = post(
                backend, "/generate", gen("hi", adapter_id=adapter_id, adapter_source="local", max_new_tokens=2)
            )
            assert status == 422 and "outside the allowed directory" in out["error"], (adapter_id, out)
    finally:
        link.unlink()


def test_after_the_bad_requests_no_slot_is_taken_and_answers_are_right(backend):
    client = Client(backend)
    assert info(backend)["requests_in_flight"] == 0
    long = "hello " * 8334
    out = client.generate(
        long, max_new_tokens=5, truncate=50, ignore_eos_token=True
    )  # the same prompt, truncated: fine
    assert out.details.generated_tokens == 5 and out.details.prompt_tokens == 50
    a = client.generate(PROMPT, max_new_tokens=8, adapter_id=ADAPTERS[0]).generated_text
    assert a == client.generate(PROMPT, max_new_tokens=8, adapter_id=ADAPTERS[0]).generated_text


def test_32_concurrent_streams_over_4_adapters_all_correct_while_health_answers(backend):
    client = Client(backend)
    expected = {
        a: client.generate(
            PROMPT, max_new_tokens=20, adapter_id=a, adapter_source=SOURCES.get(a, "hub"), ignore_eos_token=True
        ).generated_text
        for a in ADAPTERS
    }

    def health() -> tuple[float, int]:
        t = time.monotonic()
        try:
            status = urllib.request.urlopen(f"{backend}/health", timeout=5).status
        except OSError:
            status = 0
        return time.monotonic() - t, status

    in_flight: list[tuple[float, int]] = []  # health asked when the first stream had its first token

    async def one(ac, a, begun: asyncio.Event):
        events = []
        async for e in ac.generate_stream(
            PROMPT, max_new_tokens=20, adapter_id=a, adapter_source=SOURCES.get(a, "hub"), ignore_eos_token=True
        ):
            begun.set()
            events.append(e)
        return a, "".join(e.token.text for e in events if not e.token.special), events[-1]

    async def run():
        ac = AsyncClient(backend, timeout=300)
        begun = asyncio.Event()
        tasks = [asyncio.ensure_future(one(ac, ADAPTERS[i % 4], begun)) for i in range(32)]
        # event-driven, not timed: /health is asked the moment a stream has its first token (19 still to come),
        # so it is answered while streams generate, however fast or slow the machine
        await begun.wait()
        in_flight.append(await asyncio.to_thread(health))
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert len(results) == 32
    for a, text, last in results:
        assert last.details.generated_tokens == 20
        assert text == last.generated_text == expected[a]
    # health answered while the 32 streams ran (the server batches streams; it must not block its own health route)
    assert in_flight and all(status == 200 for _, status in in_flight), in_flight
    assert health()[1] == 200


@pytest.fixture(scope="module")
def small_backend(hub, pushed):
    """A backend admitting 8 requests at a time, long generations allowed (512 tokens)."""
    from soppu_hub.launch import start_backend

    child = start_backend(hub.base_model, extra=["--max-concurrent-requests", "8", "--max-total-tokens", "512"])
    try:
        yield child.url
    finally:
        child.stop()


def _send(url: str, path: str, **params) -> http.client.HTTPConnection:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", path, body=gen(PROMPT, **params), headers={"Content-Type": "application/json"})
    return conn


def _vanish(conn: http.client.HTTPConnection) -> None:
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def _wait_idle(url: str, deadline_s: float = 60) -> dict:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        i = info(url)
        if i["requests_in_flight"] == 0:
            return i
        time.sleep(0.1)
    raise AssertionError(f"requests still in flight after {deadline_s}s: {info(url)}")


def test_clients_that_vanish_mid_stream_free_their_slots(small_backend):
    url = small_backend
    cancelled = info(url)["requests_cancelled"]
    conns = [_send(url, "/generate_stream", max_new_tokens=480, ignore_eos_token=True) for _ in range(10)]
    try:
        responses = [c.getresponse() for c in conns]  # all 10 are in before any answer is read: 8 fit, 2 are 429
        assert sorted(r.status for r in responses) == [200] * 8 + [429] * 2
        first = next(r for r in responses if r.status == 200)
        assert first.read(5) == b"data:"  # tokens are flowing: the clients leave mid-stream
    finally:
        for conn in conns:
            _vanish(conn)
    idle = _wait_idle(url)
    assert idle["requests_cancelled"] - cancelled == 8  # stopped early, not run to 480 tokens for nobody

    # the server keeps serving: 8 new requests at once are all admitted and answered in full
    async def eight():
        ac = AsyncClient(url, timeout=300)
        return await asyncio.gather(*[ac.generate(PROMPT, max_new_tokens=12, ignore_eos_token=True) for _ in range(8)])

    results = asyncio.run(eight())
    assert [r.details.generated_tokens for r in results] == [12] * 8 and len({r.generated_text for r in results}) == 1


def test_clients_that_hang_up_on_a_plain_generate_free_their_slots(small_backend):
    url = small_backend
    cancelled = info(url)["requests_cancelled"]
    conns = [_send(url, "/generate", max_new_tokens=480, ignore_eos_token=True) for _ in range(4)]
    try:
        end = time.monotonic() + 60
        while info(url)["requests_in_flight"] < 4 and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        for conn in conns:
            _vanish(conn)
    assert _wait_idle(url)["requests_cancelled"] - cancelled == 4
    assert Client(url).generate(PROMPT, max_new_tokens=3).details.generated_tokens <= 3
