"""A quantized collection resident as its codes (issue 34): every member's part de-quantized per batch row gives the
same delta as the values its reader gets; a running backend serves each member as its export, and /info says the
resident bytes."""

import json
import urllib.request

import pytest
import torch
from helpers import compress_local
from lorax import Client

from lab.samples import family_factors, llama_module_shapes, write_adapter
from soppu_hub.launch import start_backend

PROMPT = "Hello! How are you today?"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_base):
    """10 adapters (8 of 2 families, 2 that share nothing: private directions) as an NF4 collection, and the same as
    bf16."""
    root = tmp_path_factory.mktemp("qres")
    facs, _ = family_factors(llama_module_shapes(), 8, 4, families=2, noise=0.02, seed=3)
    alone, _ = family_factors(llama_module_shapes(), 2, 4, families=2, noise=0.3, seed=4)
    folders = [
        write_adapter(root / "in" / f"m{i}", f, base_model=str(tiny_base), rank=4, alpha=32)
        for i, f in enumerate(facs + alone)
    ]
    for kind in ("nf4", "bf16"):
        assert (
            compress_local(
                [*map(str, folders)],
                str(root / kind),
                "--rank",
                "8",
                "--clusters",
                "2",
                "--target-error",
                "0.05",
                "--collection",
                "acme/q",
                "--store-dtype",
                kind,
            )
            == 0
        )
    return root


def test_codes_held_per_member_give_the_same_deltas_as_its_values_in_fewer_bytes(quantized):
    from soppu_hub.serve.resident import ResidentRows, _stack, load_resident

    res = load_resident(quantized / "nf4" / "collection")
    values = load_resident(quantized / "nf4" / "collection")  # the same values held as float32 stacks
    from soppu_hub.collection.remote import open_collection
    from soppu_hub.compression.bundle import load_bundle

    coll = open_collection(quantized / "nf4" / "collection")
    bases = {c: coll.bases(c) for c in range(len(coll.info.clusters))}
    bundles = [load_bundle(quantized / "nf4" / m.name / "soppu", bases=bases[m.cluster]) for m in coll.members]
    private = 0
    for key in res.modules:
        values.modules[key] = _stack(key, bases, bundles, torch.float32, None)
        private += res.modules[key].Xt is not None
    assert private > 0  # the adapters that share nothing keep private directions, held as codes too
    torch.manual_seed(0)
    slots = torch.tensor([0, 9, 3, 8, 5])
    rows = ResidentRows(None, slots, res.cluster.index_select(0, slots))
    x = torch.randn(5, 3, next(iter(res.modules.values())).Vt.shape[2])
    for key, st in res.modules.items():
        if st.Vt.shape[2] != x.shape[2]:
            continue
        want = values.modules[key].applier(rows)(x)
        torch.testing.assert_close(st.applier(rows)(x), want, rtol=1e-5, atol=1e-6)
    from soppu_hub.serve.quantized import QuantizedItems

    def per_member(r) -> int:  # what grows with the members: codes, scales, offsets (not the bases, not the index
        # tables, one per distinct item shape: 80 kB here, the same for a thousand members)
        held = [h for st in r.modules.values() for h in (st.cores, st.P, st.Q, st.Xt, st.Yt) if h is not None]
        return sum(h.nbytes() - h.place.numel() * 4 if isinstance(h, QuantizedItems) else h.numel() * 4 for h in held)

    assert per_member(res) < 0.25 * per_member(values)  # 4.25 bits against 32 a number, offsets and shapes included
    assert res.summary()["bytes"] == res.nbytes()  # what /info reports (bench serve: 1000 members, 0.31x of bf16's)


@pytest.mark.e2e
def test_a_backend_serves_a_quantized_collection_as_each_members_export(quantized, tiny_base):
    child = start_backend(
        str(tiny_base), extra=["--collection", str(quantized / "nf4" / "collection"), "--adapter-dir", str(quantized)]
    )
    try:
        client = Client(child.url)
        res = json.loads(urllib.request.urlopen(f"{child.url}/info").read())["resident_collection"]
        assert res["members"] == 10 and res["bytes"] > 0
        for name in ("m0", "m9"):  # a family member, and one with private directions
            resident = client.generate(
                PROMPT, max_new_tokens=12, adapter_id=name, adapter_source="local", details=True, ignore_eos_token=True
            )
            exported = client.generate(
                PROMPT,
                max_new_tokens=12,
                adapter_id=f"nf4/{name}",
                adapter_source="local",
                details=True,
                ignore_eos_token=True,
            )
            assert [t.id for t in resident.details.tokens] == [t.id for t in exported.details.tokens]
    finally:
        child.stop()
