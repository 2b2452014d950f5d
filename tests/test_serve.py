"""The embedded backend as a real process, driven by the official lorax-client (sync and async)."""

import asyncio
import json
import urllib.request

import pytest
import torch
from conftest import USERS
from lorax import AsyncClient, Client
from lorax.errors import GenerationError, ValidationError

pytestmark = pytest.mark.e2e  # real servers over loopback

ADAPTER = "alice/support-bot-soppu"
PROMPT = "Hello! How are you today?"


def peft_greedy(hub_base: str, adapter: str | None, prompt: str, n: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hub_base)
    model = AutoModelForCausalLM.from_pretrained(hub_base, dtype=torch.float32).eval()
    if adapter:
        model = PeftModel.from_pretrained(model, adapter).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1] :].tolist()


def test_greedy_with_adapter_matches_peft_in_process(hub, backend):
    client = Client(backend)
    with_adapter = client.generate(
        PROMPT, max_new_tokens=16, adapter_id=ADAPTER, adapter_source="hub", details=True, ignore_eos_token=True
    )
    base = client.generate(PROMPT, max_new_tokens=16, details=True, ignore_eos_token=True)
    got = [t.id for t in with_adapter.details.tokens]
    assert got != [t.id for t in base.details.tokens]  # the adapter changes the output
    assert got == peft_greedy(hub.base_model, ADAPTER, PROMPT, 16)
    assert [t.id for t in base.details.tokens] == peft_greedy(hub.base_model, None, PROMPT, 16)
    d = with_adapter.details
    assert d.generated_tokens == 16 and d.finish_reason.value == "length" and d.prompt_tokens > 0
    assert all(isinstance(t.logprob, float) and t.logprob <= 0 for t in d.tokens)


def test_a_short_request_joins_a_running_batch_and_leaves_first(backend):
    """Continuous batching: a 4-token request sent while a 200-token one streams joins at the next step and is
    done while the long one still streams; both get the very tokens they get alone (greedy, mixed adapters)."""
    import threading
    import time

    client = Client(backend)
    alone_long = client.generate(PROMPT, max_new_tokens=200, adapter_id=ADAPTER, ignore_eos_token=True).generated_text
    alone_short = client.generate("Tell me a joke.", max_new_tokens=4, ignore_eos_token=True).generated_text
    seen, long_text, started = [], [], threading.Event()

    def long_stream():
        for r in client.generate_stream(PROMPT, max_new_tokens=200, adapter_id=ADAPTER, ignore_eos_token=True):
            seen.append(time.monotonic())
            started.set()
            if not r.token.special:  # generated_text leaves special tokens out; the stream marks them
                long_text.append(r.token.text)

    t = threading.Thread(target=long_stream)
    t.start()
    assert started.wait(60)
    short = client.generate("Tell me a joke.", max_new_tokens=4, ignore_eos_token=True)
    short_done, tokens_then = time.monotonic(), len(seen)
    t.join(120)
    assert short.generated_text == alone_short and "".join(long_text) == alone_long
    assert tokens_then < 200 and seen[-1] > short_done  # the long one was still streaming when the short one ended


def test_stream_concatenates_to_final_text_sync_and_async(backend):
    client = Client(backend)
    events = list(client.generate_stream(PROMPT, max_new_tokens=24, adapter_id=ADAPTER))
    final = events[-1]
    assert final.generated_text is not None and final.details is not None
    assert all(e.generated_text is None for e in events[:-1])
    assert "".join(e.token.text for e in events if not e.token.special) == final.generated_text
    assert final.details.generated_tokens == len(events)
    plain = client.generate(PROMPT, max_new_tokens=24, adapter_id=ADAPTER)
    assert plain.generated_text == final.generated_text

    async def run():
        ac = AsyncClient(backend)
        r = await ac.generate(PROMPT, max_new_tokens=24, adapter_id=ADAPTER)
        pieces = [e async for e in ac.generate_stream(PROMPT, max_new_tokens=24, adapter_id=ADAPTER)]
        return r, pieces

    r, pieces = asyncio.run(run())
    assert r.generated_text == final.generated_text == pieces[-1].generated_text


def test_error_classes_map_to_lorax_exceptions(backend, local_adapters):
    client = Client(backend)
    with pytest.raises(GenerationError, match="cannot be loaded"):
        client.generate(PROMPT, max_new_tokens=4, adapter_id="alice/no-such-adapter")
    with pytest.raises(GenerationError, match="trained for someone/else"):
        client.generate(PROMPT, max_new_tokens=4, adapter_id="other-base", adapter_source="local")
    with pytest.raises(ValidationError, match="max_new_tokens"):
        client.generate(PROMPT, max_new_tokens=10_000)
    with pytest.raises(ValidationError, match="outside the allowed directory"):
        client.generate(PROMPT, max_new_tokens=4, adapter_id=str(local_adapters.parent), adapter_source="local")
    with pytest.raises(GenerationError):
        list(client.generate_stream(PROMPT, max_new_tokens=4, adapter_id="alice/no-such-adapter"))
    # the server survived all of that
    assert client.generate(PROMPT, max_new_tokens=2).generated_text is not None


def test_local_private_and_lru(backend, hub):
    from huggingface_hub import HfApi, snapshot_download

    client = Client(backend)
    api = HfApi(token=USERS["alice"])
    api.create_repo("alice/private-support", private=True, exist_ok=True)
    api.upload_folder(
        repo_id="alice/private-support", folder_path=snapshot_download(ADAPTER), allow_patterns=["adapter_*"]
    )
    with pytest.raises(GenerationError):
        client.generate(PROMPT, max_new_tokens=4, adapter_id="alice/private-support")
    ok = client.generate(PROMPT, max_new_tokens=8, adapter_id="alice/private-support", api_token=USERS["alice"])
    assert ok.generated_text == client.generate(PROMPT, max_new_tokens=8, adapter_id=ADAPTER).generated_text
    # more distinct adapters than --max-adapters 3: all still answer, at most 3 stay loaded
    names = [("support-bot", "local"), ("pirate-talk", "local"), ("alice/pirate-talk-soppu", "hub"), (ADAPTER, "hub")]
    for name, source in names * 2:
        assert (
            client.generate(PROMPT, max_new_tokens=3, adapter_id=name, adapter_source=source).generated_text is not None
        )
    info = json.loads(urllib.request.urlopen(f"{backend}/info").read())
    assert len(info["loaded_adapters"]) <= 3 and info["model_id"] == hub.base_model


def test_openai_chat_tokenize_info(backend, hub):
    def post(path, body):
        req = urllib.request.Request(
            f"{backend}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        return json.loads(urllib.request.urlopen(req).read())

    out = post(
        "/v1/chat/completions", {"model": ADAPTER, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    )
    assert out["object"] == "chat.completion" and out["usage"]["completion_tokens"] <= 5
    assert isinstance(out["choices"][0]["message"]["content"], str)
    toks = post("/tokenize", {"inputs": "Hello world"})
    assert toks and all({"id", "text", "start", "stop"} <= set(t) for t in toks)
    info = json.loads(urllib.request.urlopen(f"{backend}/info").read())
    assert info["max_total_tokens"] == 256 and "<|assistant|>" in info["chat_template"]


def test_adapters_of_one_bundle_share_a_resident_basis(hub, pushed, backend):
    from soppu_hub.launch import start_backend

    pair = ["alice/support-bot-soppu", "alice/pirate-talk-soppu"]

    def run(url):
        client = Client(url)
        texts = [
            client.generate(PROMPT, max_new_tokens=12, adapter_id=a, ignore_eos_token=True).generated_text for a in pair
        ]
        return texts, json.loads(urllib.request.urlopen(f"{url}/info").read())

    plain = start_backend(hub.base_model, extra=["--no-shared-bases"])
    try:
        plain_texts, plain_info = run(plain.url)
    finally:
        plain.stop()
    shared = start_backend(hub.base_model)
    try:
        shared_texts, shared_info = run(shared.url)
    finally:
        shared.stop()
    assert shared_texts == plain_texts  # same deltas, U S_i V^T either way
    (basis,) = shared_info["shared_bases"].values()
    assert basis["adapters"] == 2 and basis["shared_params"] > 0
    assert plain_info["shared_bases"] == {}
    assert shared_info["resident_lora_params"] < plain_info["resident_lora_params"]


def test_each_cluster_is_one_resident_basis(hub, tmp_path):
    """4 adapters from 2 families compressed with --clusters 2: the backend holds two bases, each shared by 2."""
    from lab.samples import family_factors, llama_module_shapes, write_adapter
    from soppu_hub.cli import main
    from soppu_hub.launch import start_backend

    facs, fam = family_factors(llama_module_shapes(), 4, 4, families=2, noise=0.02, seed=9)
    folders = [
        write_adapter(tmp_path / "in" / f"fam{f}-{i}", x, base_model=hub.base_model, rank=4, alpha=8)
        for i, (x, f) in enumerate(zip(facs, fam))
    ]
    out = tmp_path / "out"
    assert (
        main(
            [
                "compress",
                *map(str, folders),
                "--rank",
                "4",
                "--clusters",
                "2",
                "--no-push",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    child = start_backend(hub.base_model, extra=["--adapter-dir", str(out), "--max-adapters", "8"])
    try:
        client = Client(child.url)
        for f in folders:
            client.generate(PROMPT, max_new_tokens=4, adapter_id=f.name, adapter_source="local")
        info = json.loads(urllib.request.urlopen(f"{child.url}/info").read())
    finally:
        child.stop()
    bases = info["shared_bases"]
    assert len(bases) == 2 and sorted(b["adapters"] for b in bases.values()) == [2, 2]


def test_collection_members_joined_or_compressed_share_one_resident_basis(hub, tmp_path):
    """3 adapters compressed as the collection acme/served (pushed), 3 more joined one by one (pushed): a real
    backend loading all six by repo id holds one basis, fetched from the collection, with 6 adapters on it."""
    from lab.samples import family_factors, llama_module_shapes, write_adapter
    from soppu_hub.cli import main
    from soppu_hub.launch import start_backend

    facs, _ = family_factors(llama_module_shapes(), 6, 4, families=1, noise=0.02, seed=11)
    folders = [
        write_adapter(tmp_path / "in" / f"served-{i}", x, base_model=hub.base_model, rank=4, alpha=8)
        for i, x in enumerate(facs)
    ]
    token = USERS["alice"]
    # in alice's org, not her own namespace: the Space tests list alice's own soppu repos
    assert (
        main(
            [
                "compress",
                *map(str, folders[:3]),
                "--rank",
                "8",
                "--collection",
                "acme/served",
                "--token",
                token,
                "--namespace",
                "acme",
                "--quiet",
            ]
        )
        == 0
    )
    for f in folders[3:]:
        assert (
            main(
                [
                    "join",
                    str(f),
                    "--collection",
                    "acme/served",
                    "--token",
                    token,
                    "--max-error",
                    "0.5",
                    "--namespace",
                    "acme",
                    "--quiet",
                ]
            )
            == 0
        )
    child = start_backend(hub.base_model, extra=["--max-adapters", "8"])
    try:
        client = Client(child.url)
        for f in folders:
            assert client.generate(
                PROMPT, max_new_tokens=4, adapter_id=f"acme/{f.name}-soppu", api_token=token
            ).generated_text
        info = json.loads(urllib.request.urlopen(f"{child.url}/info").read())
    finally:
        child.stop()
    (basis,) = info["shared_bases"].values()
    assert basis["adapters"] == 6


@pytest.mark.e2e
def test_bench_serve_reports_every_case_as_json():
    """`python -m lab bench serve --json`: one object other tools can read (small sizes here; docs/ has a real run)."""
    import json

    from lab.bench.serve import format_serve, run_serve_bench

    m = json.loads(run_serve_bench(2, 4, as_json=True, repeats=1, hidden=64, layers=1, lora_rank=4, rank=4))
    assert [c["requests"] for c in m["cases"]] == [1, 2, 2, 2, 2, 2, 2]
    assert [c["distinct_adapters"] for c in m["cases"]] == [1, 0, 1, 2, 2, 2, 2]
    assert m["factored_over_square"] == pytest.approx(m["cases"][5]["tokens_per_s"] / m["cases"][6]["tokens_per_s"])
    for c in m["cases"]:
        assert c["tokens"] == 4 * c["requests"] and c["tokens_per_s"] == pytest.approx(c["tokens"] / c["seconds"])
    assert m["distinct_over_one"] == pytest.approx(m["cases"][3]["tokens_per_s"] / m["cases"][2]["tokens_per_s"])
    lat = m["short_during_long"]
    assert lat["long_tokens"] == 256 and lat["short_tokens"] == 4 and 0 < lat["short_seconds"]
    assert m["resident_lora_params"]["jd_shared"] < m["resident_lora_params"]["originals"]
    table = format_serve(m)
    assert "2 distinct adapters:" in table and "a 4-token request sent while a 256-token one runs" in table
    assert "at rank 16 factored cores run" in table
