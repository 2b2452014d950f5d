"""A collection resident at once (issue 22): bases once, cores stacked, members by name; and --max-lora-memory.

Real backends (`soppu-hub serve`) over loopback, driven by the official lorax-client.
"""

import argparse
import asyncio
import json
import urllib.error
import urllib.request

import pytest
from helpers import compress_local, join_local
from lorax import AsyncClient, Client
from lorax.errors import GenerationError
from safetensors.torch import load_file

from lab.samples import family_factors, llama_module_shapes, write_adapter
from soppu_hub.cli import main
from soppu_hub.launch import start_backend

pytestmark = pytest.mark.e2e
PROMPT = "Hello! How are you today?"


@pytest.fixture(scope="module")
def collection(tmp_path_factory, tiny_base):
    """8 adapters of 2 families for the tiny base, compressed as a local collection (2 clusters, rank 8)."""
    root = tmp_path_factory.mktemp("resident")
    facs, _ = family_factors(llama_module_shapes(), 8, 4, families=2, noise=0.02, seed=3)
    folders = [
        write_adapter(root / "in" / f"m{i}", f, base_model=str(tiny_base), rank=4, alpha=32) for i, f in enumerate(facs)
    ]
    assert (
        compress_local(
            [*map(str, folders)], str(root / "out"), "--rank", "8", "--clusters", "2", "--collection", "acme/resident"
        )
        == 0
    )
    return root


def info(url: str) -> dict:
    return json.loads(urllib.request.urlopen(f"{url}/info").read())


def greedy(client: Client, adapter: str | None, source: str = "local") -> list[int]:
    r = client.generate(
        PROMPT, max_new_tokens=12, adapter_id=adapter, adapter_source=source, details=True, ignore_eos_token=True
    )
    return [t.id for t in r.details.tokens]


def test_a_resident_collection_serves_every_member_as_its_own_export(collection, tiny_base):
    child = start_backend(
        str(tiny_base),
        extra=[
            "--collection",
            str(collection / "out" / "collection"),
            "--adapter-dir",
            str(collection),
            "--max-adapters",
            "2",
        ],
    )
    try:
        client = Client(child.url)
        got = info(child.url)
        res = got["resident_collection"]
        assert res["members"] == 8 and res["clusters"] == 2 and res["collection"].endswith("collection")
        plain = sum(
            t.numel()
            for i in range(8)
            for t in load_file(str(collection / "out" / f"m{i}" / "adapter_model.safetensors")).values()
        )
        assert res["params"] < plain  # bases once per cluster + 8 x cores, against 8 full exports
        base = greedy(client, None)
        for i in (0, 5):
            resident = greedy(client, f"m{i}")  # by name: the resident stack
            exported = greedy(client, f"out/m{i}")  # its PEFT export, loaded the usual way
            assert resident == exported and resident != base
        # a mixed batch: resident members of both clusters, a PEFT-loaded adapter and the base model together
        alone = {a: greedy(client, a) for a in ("m1", "m6", "out/m2")}

        async def together():
            c = AsyncClient(child.url)
            rs = await asyncio.gather(
                *[
                    c.generate(
                        PROMPT,
                        max_new_tokens=12,
                        adapter_id=a,
                        adapter_source="local",
                        details=True,
                        ignore_eos_token=True,
                    )
                    for a in ("m1", "m6", "out/m2", None)
                ]
            )
            return [[t.id for t in r.details.tokens] for r in rs]

        assert asyncio.run(together()) == [alone["m1"], alone["m6"], alone["out/m2"], base]
        assert info(child.url)["resident_collection"]["members"] == 8  # no LRU touches them
    finally:
        child.stop()


def test_max_lora_memory_evicts_by_bytes_and_refuses_an_adapter_that_alone_is_too_big(sample_adapters, tiny_base):
    from soppu_hub.serve.adapters import lora_bytes

    one = sum(
        t.numel() * 4 for t in load_file(str(sample_adapters[0] / "adapter_model.safetensors")).values()
    )  # float32
    assert (
        lora_bytes(sample_adapters[0]) == one and lora_bytes(sample_adapters[0].parent) == 0
    )  # no file: 0, load says why
    root = str(sample_adapters[0].parent)
    child = start_backend(
        str(tiny_base), extra=["--adapter-dir", root, "--max-adapters", "8", "--max-lora-memory", str(int(1.5 * one))]
    )
    try:
        client = Client(child.url)
        for folder in sample_adapters[:2]:
            greedy(client, folder.name)
        got = info(child.url)
        assert got["loaded_adapters"] == [f"local:{sample_adapters[1].name}"]  # the older one left to make room
        assert 0 < got["resident_lora_bytes"] <= 1.5 * one
    finally:
        child.stop()
    child = start_backend(str(tiny_base), extra=["--adapter-dir", root, "--max-lora-memory", "1KB"])
    try:
        with pytest.raises(GenerationError, match="more than --max-lora-memory 1,000"):
            greedy(Client(child.url), sample_adapters[0].name)
        assert info(child.url)["loaded_adapters"] == [] and greedy(Client(child.url), None)  # still serving
    finally:
        child.stop()


def test_an_adapter_is_measured_alone_not_with_what_others_are_loading(sample_adapters, tiny_base):
    """In-process: while another request's adapter sits in PEFT mid-load (not yet in the LRU), an adapter that fits
    the bound alone is served, not refused as too big (the total of both was once taken as its size)."""
    import threading

    from transformers import AutoModelForCausalLM

    from soppu_hub.serve.adapters import AdapterStore, lora_bytes

    one = lora_bytes(sample_adapters[1])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    store = AdapterStore(
        model,
        tiny_base,
        model_id=str(tiny_base),
        lock=threading.RLock(),
        max_adapters=8,
        local_root=sample_adapters[0].parent,
        max_lora_bytes=int(1.5 * one),
    )
    store.host.load(sample_adapters[0], "mid_load", None)  # another request's load, not yet registered
    assert store.memory()["resident_lora_bytes"] == lora_bytes(sample_adapters[0]) > 0.5 * one
    name, release = store.acquire(sample_adapters[1].name, "local", None)
    release()
    assert store.loaded_ids() == [f"local:{sample_adapters[1].name}"] and name in store.host.peft.peft_config
    assert store.memory()["resident_lora_bytes"] > 1.5 * one  # the total is over the bound; the adapter alone is not


def test_bad_sizes_and_damaged_collections_are_one_line_at_start(collection, tiny_base, capsys, tmp_path):
    import shutil

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", str(tiny_base), "--max-lora-memory", "lots"])
    assert exit_.value.code == 2
    assert "not a positive size" in capsys.readouterr().err
    shutil.copytree(collection / "out", tmp_path / "out")
    (tmp_path / "out" / "collection" / "clusters" / "members-0.json").write_text("{not json")
    assert (
        main(["serve", "--model", str(tiny_base), "--collection", str(tmp_path / "out" / "collection"), "--port", "1"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--collection" in err and "members-0.json" in err, err


def test_byte_sizes():
    from soppu_hub.cli.flags import byte_size

    assert byte_size("64MB") == 64_000_000 and byte_size("1.5GiB") == 3 * 2**29 and byte_size("4096") == 4096
    for bad in ("0", "-5MB", "12 parsecs", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            byte_size(bad)


@pytest.mark.parametrize("n_rows", [2, 4, 6])  # fewer rows than clusters, as many, more
def test_a_resident_rows_delta_is_its_own_members_u_s_vt_x(n_rows):
    import torch

    from soppu_hub.serve.resident import ModuleStack, ResidentRows

    g = torch.Generator().manual_seed(1)
    U, Vt = torch.randn(4, 10, 3, generator=g), torch.randn(4, 3, 7, generator=g)
    cluster, cores = torch.tensor([0, 3, 1, 3, 2]), torch.randn(5, 3, 3, generator=g)
    P, Q = torch.randn(5, 3, 1, generator=g), torch.randn(5, 1, 3, generator=g)
    slots = torch.randint(0, 5, (n_rows,), generator=g)
    x = torch.randn(n_rows, 2, 7, generator=g)
    for st, S in ((ModuleStack(U, Vt, cores=cores), cores), (ModuleStack(U, Vt, P=P, Q=Q), P @ Q)):
        rows = ResidentRows(None, slots, cluster[slots])
        got = st.applier(rows)(x)
        for row, k in enumerate(slots.tolist()):
            c = int(cluster[k])
            torch.testing.assert_close(got[row], x[row] @ (U[c] @ S[k] @ Vt[c]).T)


def post(url: str, headers: dict | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="POST", headers=headers or {})) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_reloading_needs_the_admin_token_when_the_server_has_one(collection, tiny_base, tmp_path):
    """Started with --admin-token (here from $SOPPU_ADMIN_TOKEN): a reload without it, or with another, is a 403
    in LoRAX's error shape and changes nothing; with it, the reload runs. /info says which rule holds."""
    import os

    child = start_backend(
        str(tiny_base),
        extra=["--collection", str(collection / "out" / "collection")],
        env=dict(os.environ, SOPPU_ADMIN_TOKEN="s3cret-admin"),
    )
    try:
        assert json.loads(urllib.request.urlopen(f"{child.url}/info").read())["admin_routes"] == "token"
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, body = post(f"{child.url}/collection/reload", headers)
            assert status == 403 and body["error_type"] == "forbidden" and "--admin-token" in body["error"], body
            assert "s3cret" not in body["error"]
        status, body = post(f"{child.url}/collection/reload", {"Authorization": "Bearer s3cret-admin"})
        assert status == 200 and body["members"] == body["members_before"] == 8, body
    finally:
        child.stop()


def test_without_a_token_admin_routes_answer_this_machine_only(tiny_base):
    """No --admin-token: a client from elsewhere (FastAPI's test client is not on loopback) is refused with 403,
    before the route does anything."""
    from fastapi.testclient import TestClient

    from soppu_hub.serve.api import create_app
    from soppu_hub.serve.config import ServeConfig
    from soppu_hub.serve.engine import Engine

    client = TestClient(create_app(Engine(tiny_base, ServeConfig(model=str(tiny_base)))))
    r = client.post("/collection/reload")
    assert r.status_code == 403 and "answers this machine only" in r.json()["error"], r.text
    assert client.get("/info").json()["admin_routes"] == "loopback only"


def test_a_running_server_reloads_its_collection_and_keeps_it_when_the_new_one_is_damaged(
    collection, tiny_base, tmp_path
):
    """A member that joined after start becomes servable by a reload; a damaged file is one line (422) and every
    member keeps answering exactly as before."""
    import shutil

    shutil.copytree(collection / "out", tmp_path / "out")
    coll = tmp_path / "out" / "collection"
    child = start_backend(str(tiny_base), extra=["--collection", str(coll), "--adapter-dir", str(tmp_path)])
    try:
        client = Client(child.url)
        before = {a: greedy(client, a) for a in ("m0", "m5")}
        with pytest.raises(GenerationError):
            greedy(client, "m8", source="hub")  # not a member yet, not on any Hub
        facs, _ = family_factors(llama_module_shapes(), 1, 4, families=2, noise=0.02, seed=3, offset=8)
        write_adapter(tmp_path / "in" / "m8", facs[0], base_model=str(tiny_base), rank=4, alpha=32)
        assert join_local(tmp_path / "in" / "m8", coll, tmp_path / "out" / "m8") == 0
        status, body = post(f"{child.url}/collection/reload")
        assert status == 200 and body["members"] == 9 and body["members_before"] == 8, body
        assert info(child.url)["resident_collection"]["members"] == 9
        assert greedy(client, "m8", source="hub") == greedy(client, "out/m8")  # resident == its own PEFT export
        assert {a: greedy(client, a) for a in before} == before

        m3 = next(p for p in (coll / "clusters").glob("members-*.json") if '"m3"' in p.read_text())
        kept = m3.read_text()
        m3.write_text(json.dumps({"members": [m for m in json.loads(kept)["members"] if m["name"] != "m3"]}))
        status, body = post(f"{child.url}/collection/reload")  # in-flight requests may name a member: never dropped
        assert status == 422 and "drops members m3" in body["error"], body
        m3.write_text(kept)
        (coll / "clusters" / "cluster-1.safetensors").write_bytes(b"not a safetensors file")
        status, body = post(f"{child.url}/collection/reload")
        assert status == 422 and body["error_type"] == "validation" and "\n" not in body["error"], body
        assert "not reloaded" in body["error"] and "still serving" in body["error"] and "cluster-1" in body["error"]
        assert info(child.url)["resident_collection"]["members"] == 9
        assert {a: greedy(client, a) for a in before} == before
    finally:
        child.stop()


def test_max_lora_memory_is_checked_at_start_against_any_lora_and_the_preloaded_adapters(
    sample_adapters, tiny_base, capsys
):
    root = str(sample_adapters[0].parent)
    base = ["serve", "--model", str(tiny_base), "--port", "1", "--adapter-dir", root]
    assert main([*base, "--max-lora-memory", "100"]) == 2  # below a rank-1 LoRA on the smallest module
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--max-lora-memory 100 bytes cannot hold any LoRA" in err, err
    one = sum(t.numel() * 4 for t in load_file(str(sample_adapters[0] / "adapter_model.safetensors")).values())
    assert main([*base, "--max-lora-memory", str(one // 2), "--preload", sample_adapters[0].name]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and sample_adapters[0].name in err and "more than --max-lora-memory" in err, err
    assert main([*base, "--max-adapters", "1", "--preload", sample_adapters[0].name, sample_adapters[1].name]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "do not fit together" in err and f"local:{sample_adapters[0].name}" in err, err

    child = start_backend(
        str(tiny_base), extra=["--adapter-dir", root, "--preloaded-adapter-ids", sample_adapters[0].name]
    )
    try:
        got = info(child.url)
        assert got["preloaded_adapters"] == got["loaded_adapters"] == [f"local:{sample_adapters[0].name}"]
        assert got["resident_lora_bytes"] > 0
    finally:
        child.stop()


@pytest.mark.parametrize("bound", ["bytes", "count"])
def test_the_bounds_hold_under_a_burst_a_load_waits_for_a_release(collection, tiny_base, bound):
    """Adapters in use are never evicted; a request that needs room while every loaded adapter is in use waits
    for one to be released instead of loading past --max-lora-memory / --max-adapters."""
    import threading

    import torch
    from transformers import AutoModelForCausalLM

    from soppu_hub.serve.adapters import AdapterStore

    one = sum(t.numel() * 4 for t in load_file(str(collection / "in" / "m0" / "adapter_model.safetensors")).values())
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    store = AdapterStore(
        base,
        tiny_base,
        model_id=str(tiny_base),
        lock=threading.RLock(),
        local_root=collection / "in",
        max_adapters=8 if bound == "bytes" else 1,
        max_lora_bytes=int(1.5 * one) if bound == "bytes" else None,
    )
    _, release_m0 = store.acquire("m0", "local", None)
    got = {}
    waiting = threading.Thread(target=lambda: got.update(m1=store.acquire("m1", "local", None)))
    waiting.start()
    waiting.join(timeout=3)
    assert waiting.is_alive() and store.loaded_ids() == ["local:m0"]  # m0 is in use: m1 waits, nothing loads past it
    release_m0()
    waiting.join(timeout=60)
    assert not waiting.is_alive() and store.loaded_ids() == ["local:m1"]
    assert store.memory()["resident_lora_bytes"] == one
    got["m1"][1]()
