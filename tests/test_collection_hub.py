"""A collection on the offline Hub (real HTTP): published with its members, joined by strangers, concurrently."""

import json
import threading

import pytest
from conftest import USERS

from lab.samples import family_factors, llama_module_shapes, write_adapter
from soppu_hub.cli import main

SHAPES = llama_module_shapes(hidden=64, layers=2, targets=("q_proj", "v_proj"))
COLL = "acme/hub-coll"  # an org alice writes to: the Space tests list alice's own soppu repos


def _publish(folders: list) -> int:
    """alice publishes these adapters as the collection COLL (members in acme), as the CLI does."""
    flags = ["--rank", "8", "--clusters", "2", "--collection", COLL, "--token", USERS["alice"], "--namespace", "acme"]
    return main(["compress", *map(str, folders), *flags, "--quiet", "--device", "cpu"])


@pytest.fixture(scope="module")
def published(hub_server, tmp_path_factory):
    """10 adapters of 2 families compressed by alice as the collection acme/hub-coll (pushed), 4 kept to join."""
    root = tmp_path_factory.mktemp("hubcoll")
    facs, fam = family_factors(SHAPES, 14, 4, families=2, noise=0.02, seed=2)
    folders = [
        write_adapter(root / "in" / f"c{i:02d}", f, base_model="tiny", rank=4, alpha=8) for i, f in enumerate(facs)
    ]
    assert _publish(folders[:10]) == 0
    return folders, fam


def _members(token=USERS["alice"], revision=None):
    """Every member as its members file lists it (cluster by cluster)."""
    from dataclasses import asdict

    from soppu_hub.collection.remote import open_collection

    return [asdict(m) for m in open_collection(COLL, revision=revision, token=token).members]


def _head():
    from huggingface_hub import HfApi

    return HfApi(token=USERS["alice"]).model_info(COLL).sha


def test_compress_publishes_the_collection_then_members_naming_its_revision(published):
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi(token=USERS["alice"])
    files = set(api.list_repo_files(COLL))
    assert {
        "collection.json",
        "clusters/centroids.safetensors",
        "clusters/cluster-0.safetensors",
        "clusters/cluster-1.safetensors",
        "clusters/members-0.json",
        "clusters/members-1.json",
    } == files - {".gitattributes"}
    members = _members()
    assert sorted(m["repo_id"] for m in members) == [f"acme/c{i:02d}-soppu" for i in range(10)]
    assert all(m["revision"] and m["how"] == "compress" for m in members)
    for m in members[:2]:
        assert api.model_info(m["repo_id"]).sha == m["revision"]
        header = json.loads(open(hf_hub_download(m["repo_id"], "soppu/bundle.json", token=USERS["alice"])).read())
        ref = header["bases"]
        assert ref["collection"] == COLL and ref["cluster"] == m["cluster"]
        hf_hub_download(COLL, f"clusters/cluster-{ref['cluster']}.safetensors", revision=ref["revision"])  # it is there
        assert "soppu/bundle.safetensors" in api.list_repo_files(m["repo_id"])


def test_the_same_compress_again_pushes_nothing(published):
    folders, _ = published
    head, members = _head(), _members()
    assert _publish(folders[:10]) == 0
    assert _head() == head and _members() == members


def test_two_strangers_joining_at_once_both_land(published, monkeypatch):
    """Two joins at the same moment: the members lists get both, through commits on the head with a retry on 412;
    each join read only the collection's small files and the bases and members file of one cluster."""
    from soppu_hub.collection import remote
    from soppu_hub.collection.join import JoinSpec
    from soppu_hub.pipeline.join import run_join

    folders, fam = published
    before = len(_members())
    read = []
    real = remote.download_file
    monkeypatch.setattr(
        remote, "download_file", lambda repo, path, **kw: read.append((repo, path)) or real(repo, path, **kw)
    )
    results, errors = {}, []

    def join(i):
        try:
            results[i] = run_join(JoinSpec(str(folders[i]), COLL, token=USERS["alice"], push_to=f"acme/joined-{i}"))
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            errors.append(repr(e))

    threads = [threading.Thread(target=join, args=(i,)) for i in (10, 11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    members = {m["repo_id"]: m for m in _members()}
    assert len(members) == before + 2
    joined = [members[f"acme/joined-{i}"] for i in (10, 11)]
    assert all(m["how"] == "join" and m["revision"] for m in joined)
    cluster_of_family = {fam[i]: members[f"acme/c{i:02d}-soppu"]["cluster"] for i in range(10)}
    assert [r.cluster for r in (results[10], results[11])] == [cluster_of_family[fam[i]] for i in (10, 11)]
    assert [m["cluster"] for m in joined] == [results[10].cluster, results[11].cluster]
    paths = {p for _, p in read}
    assert paths <= {"collection.json", "clusters/centroids.safetensors"} | {
        f"clusters/{kind}-{r.cluster}.{ext}"
        for r in results.values()
        for kind, ext in (("cluster", "safetensors"), ("members", "json"))
    }
    assert sum(p.startswith("clusters/cluster-") for _, p in read) == 2  # one cluster's bases per join


def test_join_by_repo_id_downloads_the_adapter_and_lists_the_source(published):
    from soppu_hub.collection.join import JoinSpec
    from soppu_hub.hub.push import push_folder
    from soppu_hub.pipeline.join import run_join

    folders, fam = published
    push_folder(folders[13], "alice/raw-13", token=USERS["alice"])
    r = run_join(JoinSpec("alice/raw-13", COLL, token=USERS["alice"], namespace="acme"))
    assert r.repo_id == "acme/raw-13-soppu" and r.how == "join"
    entry = next(m for m in _members() if m["repo_id"] == "acme/raw-13-soppu")
    assert entry["source"] == "alice/raw-13" and entry["cluster"] == r.cluster


def test_a_member_joined_again_from_another_task_moves_cluster_and_is_listed_once(published, tmp_path):
    """The same member repo joined again with an adapter of the other family (the user retrained it): it leaves its
    old cluster's members file in the same commit that lists it in the new one. Another user's adapter of the same
    name is a member of its own."""
    import shutil

    from soppu_hub.collection.join import JoinSpec
    from soppu_hub.pipeline.join import run_join

    folders, fam = published
    other = next(i for i in range(10) if fam[i] != fam[12])
    moving = tmp_path / "moving"
    placed = []
    for i in (12, other):
        shutil.rmtree(moving, ignore_errors=True)
        shutil.copytree(folders[i], moving)
        placed.append(run_join(JoinSpec(str(moving), COLL, token=USERS["alice"], push_to="acme/moving-soppu")).cluster)
    assert placed[0] != placed[1]
    listed = [m for m in _members() if m["name"] == "moving"]
    assert [(m["repo_id"], m["cluster"]) for m in listed] == [("acme/moving-soppu", placed[1])]
    run_join(JoinSpec(str(moving), COLL, token=USERS["alice"], push_to="acme/moving-too-soppu"))
    assert sorted(m["repo_id"] for m in _members() if m["name"] == "moving") == [
        "acme/moving-soppu",
        "acme/moving-too-soppu",
    ]
    from soppu_hub.collection.remote import open_collection, update_members

    update_members(
        open_collection(COLL, token=USERS["alice"]),
        lambda ms: [m for m in ms if m.name != "moving"],
        message="tidy up",
    )  # the refit below counts the joiners of the tests before


def test_publishing_over_joined_members_is_refused_before_any_work(published, capsys):
    folders, _ = published
    head = _head()
    assert (
        main(
            [
                "compress",
                *map(str, folders[:10]),
                "--rank",
                "8",
                "--clusters",
                "2",
                "--collection",
                COLL,
                "--token",
                USERS["alice"],
                "--namespace",
                "acme",
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "member(s) this run leaves out" in err and "--refit" in err
    assert _head() == head


def test_the_space_lists_a_collections_members(published):
    from soppu_hub.errors import SoppuError
    from soppu_hub.space.logic import list_collection_members

    assert list_collection_members(COLL) == [m["repo_id"] for m in _members() if m["repo_id"]]
    with pytest.raises(SoppuError, match="not found"):
        list_collection_members("alice/no-such-collection")


def test_a_join_without_write_access_pushes_nothing(published, capsys):
    from huggingface_hub import HfApi

    folders, _ = published
    head = _head()
    assert main(["join", str(folders[12]), "--collection", COLL, "--token", USERS["bob"], "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot write" in err and "acme" in err
    assert not HfApi(token=USERS["bob"]).repo_exists("bob/c12-soppu") and _head() == head


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--collection-revision", "no-such-branch"], "does not exist"),
        (["--collection", "alice/no-such-collection"], "not found"),
    ],
)
def test_a_missing_collection_or_revision_is_one_line(published, capsys, args, expected):
    folders, _ = published
    head = _head()
    argv = ["join", str(folders[13]), "--collection", COLL, "--token", USERS["alice"], "--quiet", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err, err
    assert _head() == head


def test_a_members_list_changed_in_between_is_read_again_not_overwritten(published):
    """Someone commits to the collection after this join read the head: the Hub refuses the join's commit (412,
    parent is no longer the head), the join reads the list again and applies its change to it: both entries stay."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from soppu_hub.collection.format import Member, members_texts
    from soppu_hub.collection.remote import open_collection, update_members

    coll = open_collection(COLL, token=USERS["alice"])
    calls = []

    def change(members):
        calls.append(len(members))
        if len(calls) == 1:  # another joiner lands first
            other = members + [Member("other", 0, 0.1, 0.1, "elsewhere", "join", repo_id="alice/other-member")]
            ops = [CommitOperationAdd(p, t.encode()) for p, t in members_texts(coll.info, other).items()]
            HfApi(token=USERS["alice"]).create_commit(COLL, ops, commit_message="someone else")
        return members + [Member("mine", 1, 0.1, 0.1, "here", "join", repo_id="alice/my-member")]

    update_members(coll, change, message="mine")
    assert len(calls) == 2 and calls[1] == calls[0] + 1  # the second try saw the other entry
    listed = [m["repo_id"] for m in _members()]
    assert "alice/other-member" in listed and "alice/my-member" in listed
    update_members(
        coll,
        lambda ms: [m for m in ms if m.repo_id not in ("alice/other-member", "alice/my-member")],
        message="tidy up",
    )  # made-up members: the refit below needs real sources


def test_refit_compresses_every_member_together_and_says_how_far_joiners_drifted(published, capsys):
    from huggingface_hub import HfApi

    api = HfApi(token=USERS["alice"])
    before = _members()
    assert {m["how"] for m in before} == {"compress", "join"}  # the joins above
    revisions = {m["repo_id"]: m["revision"] for m in before}
    head = _head()
    capsys.readouterr()
    assert main(["compress", "--collection", COLL, "--refit", "--token", USERS["alice"], "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    after = _members()
    assert [m["repo_id"] for m in after] == [m["repo_id"] for m in before]  # none skipped, repos kept
    assert {m["how"] for m in after} == {"compress"} and _head() != head
    assert all(
        api.model_info(m["repo_id"]).sha == m["revision"] != revisions[m["repo_id"]]
        for m in after
        if m["repo_id"] in {j["repo_id"] for j in before if j["how"] == "join"}
    )
    joined = [r for r in before if r["how"] == "join"]
    assert len(joined) == 3 and all(any(line.startswith(m["repo_id"]) for line in out.splitlines()) for m in joined)
    assert "joined members: 3, their error was" in out


def test_refit_refuses_sources_this_machine_lacks_in_one_line(published, capsys, tmp_path):
    from soppu_hub.collection.format import Member
    from soppu_hub.collection.remote import open_collection, update_members

    coll = open_collection(COLL, token=USERS["alice"])
    update_members(
        coll,
        lambda ms: ms + [Member("gone", 0, 0.1, 0.1, str(tmp_path / "gone"), "join", repo_id="alice/gone")],
        message="a member whose source folder is elsewhere",
    )
    head = _head()
    assert main(["compress", "--collection", COLL, "--refit", "--token", USERS["alice"], "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "folders this machine lacks" in err and str(tmp_path / "gone") in err
    assert _head() == head
