"""A published collection: bases once, members with cores only, strangers joining by projection (issue 21).

Local folders here; the Hub side (push, concurrent joins, write access) is in test_collection_hub.py.
"""

import json
import shutil

import pytest
import torch
from helpers import compress_local, join_local, peft_loader
from safetensors.torch import load_file

from lab.samples import family_factors, llama_module_shapes, write_adapter
from soppu_hub.peft_format.layout import lorax_rank

SHAPES = llama_module_shapes(hidden=64, layers=2, targets=("q_proj", "v_proj"))
COLL = "alice/tiny-coll"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """12 rank-4 adapters of 2 families compressed as a collection (2 clusters, rank 8), 4 more of the same families
    and 2 of a family it has never seen, kept aside to join."""
    root = tmp_path_factory.mktemp("coll")
    facs, fam = family_factors(SHAPES, 16, 4, families=2, noise=0.02, seed=1)
    folders = [
        write_adapter(root / "in" / f"a{i:02d}", f, base_model="tiny", rank=4, alpha=8) for i, f in enumerate(facs)
    ]
    strange, _ = family_factors(SHAPES, 2, 4, families=1, noise=0.02, seed=99)
    others = [
        write_adapter(root / "in" / f"x{i}", f, base_model="tiny", rank=4, alpha=8) for i, f in enumerate(strange)
    ]
    assert (
        compress_local(
            [*map(str, folders[:12])], str(root / "out"), "--rank", "8", "--clusters", "2", "--collection", COLL
        )
        == 0
    )
    return root, folders, fam, others


def fresh(built, tmp_path):
    """A copy of the built output, so each test changes its own collection."""
    root, folders, fam, others = built
    shutil.copytree(root / "out", tmp_path / "out")
    return tmp_path / "out", folders, fam, others


def test_the_collection_holds_each_clusters_bases_once_and_members_only_their_cores(built):
    from soppu_hub.collection.format import read_collection
    from soppu_hub.collection.publish import member_bases
    from soppu_hub.collection.remote import open_collection
    from soppu_hub.compression.bundle import BundleError, load_bundle

    root, folders, fam, _ = built
    out = root / "out"
    info = read_collection(out / "collection")
    members = open_collection(out / "collection").members
    report = json.loads((out / "report.json").read_text())
    assert len(info.clusters) == 2 and info.base_model == "tiny" and info.rank == 8 and len(info.probes) >= 1
    assert info.modules == {n: list(s) for n, s in SHAPES.items()} and info.version == 3
    # one members file per cluster (a join reads and rewrites one), each listing its cluster's members in order
    assert sorted(p.name for p in (out / "collection" / "clusters").glob("members-*")) == [
        "members-0.json",
        "members-1.json",
    ]
    assert not (out / "collection" / "members.json").exists()
    by_cluster = sorted(report["adapters"], key=lambda a: a["cluster"])
    assert [(m.name, m.cluster, m.source) for m in members] == [
        (a["name"], a["cluster"], a["source"]) for a in by_cluster
    ]
    assert {m.how for m in members} == {"compress"} and sorted(m.source for m in members) == sorted(
        map(str, folders[:12])
    )
    assert load_file(str(out / "collection" / "clusters" / "centroids.safetensors"))["centroids"].shape[0] == 2
    assert not (out / "bundle").exists()
    card = (out / "a00" / "README.md").read_text()
    assert f"stored once in the collection\n[`{COLL}`]" in card and f"--collection {COLL}" in card
    for a in report["adapters"]:
        tensors = load_file(str(out / a["name"] / "soppu" / "bundle.safetensors"))
        assert not any(k.endswith((".U", ".V")) for k in tensors)  # the bases are only in the collection
        header = json.loads((out / a["name"] / "soppu" / "bundle.json").read_text())
        assert header["version"] == 3 and header["bases"] == {
            "collection": COLL,
            "revision": None,
            "cluster": a["cluster"],
        }
    with pytest.raises(BundleError, match="live in collection 'alice/tiny-coll'"):
        load_bundle(out / "a00" / "soppu")
    bundle = load_bundle(out / "a00" / "soppu", bases=member_bases(out / "a00"))
    peft = load_file(str(out / "a00" / "adapter_model.safetensors"))
    name = next(iter(SHAPES))
    B, A = bundle.factors(0)[name]
    want = peft[f"base_model.model.{name}.lora_B.weight"] @ peft[f"base_model.model.{name}.lora_A.weight"]
    torch.testing.assert_close(B @ A, want, rtol=1e-4, atol=1e-5)  # the export is the member's cores on those bases
    own = sum(t.numel() for t in load_file(str(out / "a00" / "soppu" / "bundle.safetensors")).values())
    assert own < sum(s[0] + s[1] for s in SHAPES.values()) * 8  # cores only: less than one set of bases


def test_join_projects_onto_the_nearest_cluster_exactly(built, tmp_path):
    from soppu_hub.collection.publish import member_bases
    from soppu_hub.collection.remote import open_collection
    from soppu_hub.compression.bundle import load_bundle
    from soppu_hub.peft_format.read import read_adapter

    out, folders, fam, _ = fresh(built, tmp_path)
    report = json.loads((out / "report.json").read_text())
    cluster_of_family = {fam[i]: a["cluster"] for i, a in enumerate(report["adapters"])}
    for i in (12, 13):
        assert join_local(folders[i], out / "collection", tmp_path / f"j{i}") == 0
        got = json.loads((tmp_path / f"j{i}" / "report.json").read_text())
        assert got["cluster"] == cluster_of_family[fam[i]] and got["how"] == "join"
        assert got["mean_rel_error"] < 0.1 and got["mean_rel_error"] <= got["bar"]
        card = (tmp_path / f"j{i}" / "README.md").read_text()
        assert (
            f"cluster {got['cluster']}" in card
            and "**Its bases are shared.**" in card
            and str(out / "collection") in card
        )
        assert f"{got['mean_rel_error']:.4f}" in card and "soppu-hub join" in card
        # the same LoRAX fields and card row as a compressed member (issue 35): base unknown here, padded for 2
        assert got["lorax_exact_tp"] == [
            t for t in range(1, 9) if lorax_rank(got["export_rank"], t) == got["export_rank"]
        ]
        assert got["unpadded_rank"] <= got["export_rank"] and got["export"]["lorax_tp"] == 2
        assert got["export"]["lorax_sizes"] is None and "| LoRAX tensor parallel | the base model's head counts" in card
        assert f"this export is exact at {', '.join(map(str, got['lorax_exact_tp']))} (padded for 2)" in card
        nopad = tmp_path / f"j{i}-nopad"
        assert join_local(folders[i], out / "collection", nopad, "--no-pad") == 0
        bare = json.loads((nopad / "report.json").read_text())
        assert bare["export"]["pad"] == "none" and bare["padding_params"] == 0
        assert bare["lorax_exact_tp"] == [
            t for t in range(1, 9) if lorax_rank(bare["export_rank"], t) == bare["export_rank"]
        ]
    members = {m.name: m for m in open_collection(out / "collection").members}
    assert len(members) == 14 and {members[n].how for n in ("a12", "a13")} == {"join"}
    assert [members[n].cluster for n in ("a12", "a13")] == [cluster_of_family[fam[i]] for i in (12, 13)]
    bundle = load_bundle(tmp_path / "j12" / "soppu", bases=member_bases(tmp_path / "j12"))
    adapter = read_adapter(folders[12])
    for name, mb in bundle.modules.items():  # the core is U^T W V: the least-squares best on these bases
        B, A = adapter.modules[name].factors()
        U, V = mb.U.double(), mb.V.double()
        torch.testing.assert_close(
            mb.core_matrix(0).double(), U.T @ (B.double() @ A.double()) @ V, rtol=1e-4, atol=1e-6
        )


def test_an_unseen_task_is_refused_in_one_line_and_nothing_changes(built, tmp_path, capsys):
    out, _, _, others = fresh(built, tmp_path)

    def files():
        return {p: p.read_bytes() for p in sorted((out / "collection").rglob("*")) if p.is_file()}

    before = files()
    assert join_local(others[0], out / "collection", tmp_path / "x") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no cluster of" in err and "--new-cluster" in err and "--refit" in err
    assert not (tmp_path / "x").exists() and files() == before


def test_a_collection_of_an_earlier_version_with_one_members_list_is_still_read_and_joined(built, tmp_path):
    """Versions 1 and 2 kept every member in one members.json: such a collection is read, served and joined as it
    is (the join rewrites members.json, and the collection stays at its version)."""
    from soppu_hub.collection.format import read_collection
    from soppu_hub.collection.remote import open_collection

    out, folders, _, _ = fresh(built, tmp_path)
    coll = out / "collection"
    members = [
        m for p in sorted((coll / "clusters").glob("members-*.json")) for m in json.loads(p.read_text())["members"]
    ]
    for p in (coll / "clusters").glob("members-*.json"):
        p.unlink()
    (coll / "members.json").write_text(json.dumps({"members": members}))
    body = json.loads((coll / "collection.json").read_text())
    (coll / "collection.json").write_text(json.dumps({**body, "version": 1, "sources": [m["source"] for m in members]}))
    assert [m.name for m in open_collection(coll).members] == [m["name"] for m in members]
    assert join_local(folders[12], coll, tmp_path / "j12") == 0
    listed = json.loads((coll / "members.json").read_text())["members"]
    assert [m["name"] for m in listed] == [m["name"] for m in members] + ["a12"]
    assert read_collection(coll).version == 1 and not list((coll / "clusters").glob("members-*"))


def test_the_bar_follows_the_cluster_but_never_lets_in_what_compress_calls_poorly_kept(built):
    from soppu_hub.collection.join import bar_for
    from soppu_hub.collection.remote import open_collection

    coll = open_collection(built[0] / "out" / "collection")
    assert coll.info.settings["max_adapter_error"] == 0.9
    for worst, bar in ((0.01, 0.2), (0.4, 0.5), (0.8, 0.9)):  # 1.25x the worst member, within [0.2, 0.9]
        coll.info.clusters[0].max_error = worst
        assert bar_for(coll, 0, None) == pytest.approx(bar)
    assert bar_for(coll, 0, 0.97) == 0.97  # --max-error is the user's own call
    coll.info.target_error = 0.3
    assert bar_for(coll, 0, None) == 0.3


def test_new_cluster_adds_the_adapter_with_its_own_bases(built, tmp_path, monkeypatch):
    import tempfile

    from soppu_hub.collection.format import read_collection
    from soppu_hub.collection.remote import open_collection

    out, _, _, others = fresh(built, tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert join_local(others[0], out / "collection", tmp_path / "x0", "--new-cluster") == 0
    assert not any(scratch.iterdir())  # its scratch folder is gone
    info = read_collection(out / "collection")
    assert len(info.clusters) == 3 and (out / "collection" / "clusters" / "cluster-2.safetensors").is_file()
    assert load_file(str(out / "collection" / "clusters" / "centroids.safetensors"))["centroids"].shape[0] == 3
    got = json.loads((tmp_path / "x0" / "report.json").read_text())
    assert got["cluster"] == 2 and got["how"] == "new-cluster" and got["mean_rel_error"] < 1e-5  # rank 4 <= 8: exact
    assert (
        join_local(others[1], out / "collection", tmp_path / "x1") == 0
    )  # the next of that task finds the new cluster
    assert json.loads((tmp_path / "x1" / "report.json").read_text())["cluster"] == 2
    listed = open_collection(out / "collection").cluster_members([2])
    assert [(m.name, m.how) for m in listed] == [(others[0].name, "new-cluster"), (others[1].name, "join")]


def _huge_header(path) -> None:
    """A safetensors file whose header declares one 100 GB float32 tensor, with 8 bytes of data behind it."""
    import struct

    header = json.dumps({"x.U": {"dtype": "F32", "shape": [100_000, 262_144], "data_offsets": [0, 104_857_600_000]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 8)


def _wrong_shapes(path) -> None:
    """The cluster's bases with every U one row short of what collection.json declares."""
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    save_file({k: (v[:-1].contiguous() if k.endswith(".U") else v) for k, v in t.items()}, str(path))


def _million_members(c) -> None:
    """A members file listing a million members (about 120 MB) in every cluster."""
    row = '{"name":"m%d","cluster":%d,"mean_rel_error":0.1,"max_rel_error":0.1,"source":"x","how":"compress"}'
    for k in (0, 1):
        body = ",".join(row % (i, k) for i in range(1_000_000))
        (c / "clusters" / f"members-{k}.json").write_text('{"members":[' + body + "]}")


@pytest.mark.parametrize(
    "hostile,expected",
    [
        (lambda c: [_huge_header(p) for p in (c / "clusters").glob("cluster-*.safetensors")], "cannot be read"),
        (lambda c: [_wrong_shapes(p) for p in (c / "clusters").glob("cluster-*.safetensors")], "declares"),
        (_million_members, "more than a members file can be"),
    ],
)
def test_hostile_collection_files_are_one_line_with_bounded_memory(built, tmp_path, hostile, expected):
    """A header declaring a 100 GB tensor, bases whose shapes disagree with collection.json, a million members:
    each is one line and nothing is written, and the join's peak memory stays within 100 MB of a normal join's
    (the files are refused, not read into memory)."""
    out, folders, _, _ = fresh(built, tmp_path)
    normal_rc, _, normal_peak = _join_measured(folders[13], out / "collection", tmp_path / "ok")
    assert normal_rc == 0
    hostile(out / "collection")
    rc, err, peak = _join_measured(folders[12], out / "collection", tmp_path / "j")
    assert rc == 2 and err.count("\n") == 0 and expected in err, err
    assert not (tmp_path / "j").exists()
    assert peak < normal_peak + 100 * 1024, (peak, normal_peak)  # kB


def _join_measured(source, collection, out) -> tuple[int, str, int]:
    """`soppu-hub join --no-push` in a child process: (exit code, its error line, its peak RSS in kB: VmHWM, which
    is the child's own; getrusage's maxrss would carry the forking test process's size across exec)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from soppu_hub.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
        "print(hwm.split()[1], file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    argv = ["join", str(source), "--collection", str(collection), "--no-push", "--out", str(out), "--quiet"]
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    lines = res.stderr.strip().splitlines()
    return res.returncode, "\n".join(lines[:-1]).strip(), int(lines[-1])


@pytest.mark.parametrize(
    "damage,expected",
    [
        (
            lambda c: (c / "clusters" / "members-0.json").write_text('{"members": [{"name": "a", "cluster": 7}]}'),
            "damaged or edited by hand",
        ),
        (lambda c: (c / "clusters" / "members-1.json").write_text("not json"), "damaged or edited by hand"),
        (
            lambda c: (c / "collection.json").write_text(
                json.dumps({**json.loads((c / "collection.json").read_text()), "version": 9})
            ),
            "upgrade soppu-hub",
        ),
        (
            lambda c: (c / "collection.json").write_text(
                json.dumps({**json.loads((c / "collection.json").read_text()), "clusters": []})
            ),
            "incomplete or edited by hand",
        ),
        (
            lambda c: (c / "collection.json").write_text(
                json.dumps({**json.loads((c / "collection.json").read_text()), "base_model": "other"})
            ),
            "join a collection of the same base",
        ),
        (
            lambda c: (c / "collection.json").write_text(
                json.dumps(
                    {
                        **json.loads((c / "collection.json").read_text()),
                        "modules": {
                            n: [s[0] * 2, s[1]]
                            for n, s in json.loads((c / "collection.json").read_text())["modules"].items()
                        },
                    }
                )
            ),
            "base models differ",
        ),
    ],
)
def test_damaged_or_mismatched_collections_are_refused_in_one_line(built, tmp_path, capsys, damage, expected):
    out, folders, _, _ = fresh(built, tmp_path)
    damage(out / "collection")
    before = {p.name: p.read_bytes() for p in (out / "collection").iterdir() if p.is_file()}
    assert join_local(folders[12], out / "collection", tmp_path / "j") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err, err
    assert not (tmp_path / "j").exists()
    assert {p.name: p.read_bytes() for p in (out / "collection").iterdir() if p.is_file()} == before


def test_joined_and_compressed_members_share_one_resident_basis(tmp_path):
    """3 members compressed together and 3 joined one by one, loaded into PEFT through SharedBases: one U and V
    per module for all six, and each member's forward equals its own PEFT export."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lab.samples import build_tiny_llama
    from soppu_hub.serve.shared_bases import SharedBases, resident_lora_params

    base = build_tiny_llama(tmp_path / "base")
    shapes = llama_module_shapes()
    facs, _ = family_factors(shapes, 6, 4, families=1, noise=0.02, seed=5)
    folders = [
        write_adapter(tmp_path / "in" / f"m{i}", f, base_model=str(base), rank=4, alpha=8) for i, f in enumerate(facs)
    ]
    assert (
        compress_local([*map(str, folders[:3])], str(tmp_path / "out"), "--rank", "8", "--collection", "alice/share")
        == 0
    )
    for i in (3, 4, 5):
        assert (
            join_local(folders[i], tmp_path / "out" / "collection", tmp_path / "joined" / f"m{i}", "--max-error", "0.5")
            == 0
        )
    members = [tmp_path / "out" / f"m{i}" for i in range(3)] + [tmp_path / "joined" / f"m{i}" for i in (3, 4, 5)]
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    load = peft_loader(model)

    shared = SharedBases()
    for j, folder in enumerate(members):
        peft_model = shared.load(load, folder, f"s{j}")
    summary = shared.summary()
    assert len(summary) == 1 and next(iter(summary.values()))["adapters"] == 6
    bases = next(iter(summary.values()))["shared_params"]
    assert bases == sum((m + d) * 8 for m, d in shapes.values())
    assert resident_lora_params(peft_model) < 2 * bases  # one U, V for all six plus six small cores
    ids = torch.randint(5, 300, (1, 6), generator=torch.Generator().manual_seed(0))
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(members[4]), adapter_name="p"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(input_ids=ids, adapter_names=["s4"]).logits, plain(input_ids=ids).logits, rtol=1e-4, atol=1e-4
        )


def test_an_adapter_the_bases_miss_joins_with_private_directions_and_is_served_resident(built, tmp_path, tiny_base):
    """--private-error: the unseen task joins (instead of being refused) with its own directions beside the cluster's
    bases; its member bundle (format 4) keeps only cores and those, and the resident collection serves it exactly as
    its PEFT export."""
    from soppu_hub.compression.bundle import load_bundle
    from soppu_hub.peft_format.layout import BUNDLE_DIR, BUNDLE_HEADER
    from soppu_hub.peft_format.read import read_adapter

    out, _, _, others = fresh(built, tmp_path)
    assert join_local(others[0], out / "collection", out / "x0", "--private-error", "0.05") == 0
    got = json.loads((out / "x0" / "report.json").read_text())
    assert got["how"] == "join" and got["max_rel_error"] <= 0.05 + 5e-3  # refused without --private-error (above)
    header = json.loads((out / "x0" / BUNDLE_DIR / BUNDLE_HEADER).read_text())
    assert header["version"] == 4 and "bases" in header and all("private" in m for m in header["modules"].values())
    tensors = load_file(str(out / "x0" / BUNDLE_DIR / "bundle.safetensors"))
    assert not any(k.endswith((".U", ".V")) for k in tensors)  # the bases stay in the collection
    # the export holds the shared part plus the private directions exactly
    from soppu_hub.collection.publish import member_bases

    bundle = load_bundle(out / "x0" / BUNDLE_DIR, bases=member_bases(out / "x0"))
    export = read_adapter(out / "x0")
    for name, (B, A) in bundle.factors(0).items():
        b, a = export.modules[name].factors()
        torch.testing.assert_close(b.double() @ a.double(), B.double() @ A.double(), rtol=1e-4, atol=1e-5)

    # resident: the collection's stacks gather the joiner's private rows (tiny_base shapes: a collection of its own)
    from transformers import AutoModelForCausalLM

    from soppu_hub.serve.peft_patch import install, rows_use
    from soppu_hub.serve.resident import attach, load_resident

    shapes = llama_module_shapes()
    facs, _ = family_factors(shapes, 4, 4, families=1, noise=0.02, seed=7)
    alien, _ = family_factors(shapes, 1, 4, families=1, noise=0.02, seed=77)
    folders = [
        write_adapter(tmp_path / "r" / f"m{i}", f, base_model=str(tiny_base), rank=4, alpha=8)
        for i, f in enumerate(facs + alien)
    ]
    assert (
        compress_local([*map(str, folders[:4])], str(tmp_path / "rout"), "--rank", "8", "--collection", "alice/res")
        == 0
    )
    assert (
        join_local(folders[4], tmp_path / "rout" / "collection", tmp_path / "rout" / "m4", "--private-error", "0.05")
        == 0
    )
    res = load_resident(tmp_path / "rout" / "collection")
    assert res.members == 5 and any(st.Xt is not None for st in res.modules.values())
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    load = peft_loader(model)
    peft_model = load(str(tmp_path / "rout" / "m4"), "plain")
    ids = torch.randint(5, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = peft_model(input_ids=ids, adapter_names=["plain", "plain"]).logits
        assert attach(peft_model, res) > 0 and install(peft_model) > 0
        name = next(n for n, slot in res.slots.items() if slot == 4)
        with rows_use([name, "__base__"]):  # as the engine runs a batch: the member's row beside a base row
            got, base = peft_model(input_ids=ids).logits.unbind(0)
    torch.testing.assert_close(got, want[0], rtol=1e-4, atol=1e-4)
    assert (want[1] - base).abs().max() > 1e-3
