"""The real collection's recipe: tasks with computed answers and disjoint splits, scores, configs within budget."""

from lab.collection.tasks import BY_NAME, HELD_OUT, TASKS, backwards, pirate, robot, shout
from soppu_hub.evaluate.task_eval import chrf, exact_match, score


def test_24_tasks_in_families_with_disjoint_deterministic_splits():
    assert len(TASKS) >= 24 and len({t.name for t in TASKS}) == len(TASKS)
    assert len({t.family for t in TASKS}) >= 5
    for task in TASKS:
        train, held_out = task.split()
        assert (len(train), len(held_out)) == (task.train_size, HELD_OUT)
        assert not {p for p, _ in train} & {p for p, _ in held_out}, task.name
        assert all(p and a for p, a in train + held_out), task.name
        assert task.split() == (train, held_out)  # the same on every run


def test_persona_held_out_sentences_carry_words_no_training_sentence_has():
    """The personas are measured on a person's own words: every held-out sentence has a word (from faker's lists)
    that no training sentence of any persona has, the sentences vary in length and structure, and a quarter of
    each word list is kept out of training."""
    from lab.collection.sentences import FIXED, TEMPLATES, _lists, unseen

    personas = [t for t in TASKS if t.family == "personas"]
    assert {t.name for t in personas} == {"pirate", "shouty", "robot", "backwards"}
    rule_input = lambda prompt: prompt.split(": ", 1)[1]  # noqa: E731
    trained = {w.strip(".,!") for t in personas for p, _ in t.split()[0] for w in rule_input(p).split()}
    assert not [w for w in trained if unseen(w) and w.lower() not in FIXED]
    for task in personas:
        train, held_out = task.split()
        assert len(train) >= 800 and task.steps >= 300
        for prompt, _ in held_out:
            words = {w.strip(".,") for w in rule_input(prompt).split()}
            assert words - trained, prompt  # at least one word training never showed
        lengths = {len(rule_input(p).split()) for p, _ in train}
        assert min(lengths) <= 5 and max(lengths) >= 12, sorted(lengths)
    assert len(TEMPLATES) >= 10
    lists = _lists()
    for kind in ("verb", "noun", "adj", "adv", "name"):
        share = sum(unseen(w) for w in lists[kind]) / len(lists[kind])
        assert 0.18 < share < 0.32, (kind, share)
    assert BY_NAME["robot"].split()[1][0][0].startswith("Say it like a robot: ")


def test_committed_personas_were_scored_on_todays_held_out_split():
    """Each persona adapter in the committed collection was trained and scored on the open-vocabulary split the
    recipe makes today: its eval.jsonl is that split, its manifest entry the task's config and step count."""
    from lab.collection.build import COLLECTION, read_manifest
    from soppu_hub.evaluate.task_eval import read_eval_file

    manifest = read_manifest(COLLECTION)
    for task in (t for t in TASKS if t.family == "personas"):
        assert read_eval_file(COLLECTION / "adapters" / task.name / "eval.jsonl") == task.split()[1], task.name
        entry = manifest["adapters"][task.name]
        assert (entry["rank"], tuple(entry["targets"]), entry["steps"]) == (task.rank, task.targets, task.steps)
        assert entry["held_out"]["examples"] == HELD_OUT


def test_the_demos_persona_prompts_are_held_out_never_trained():
    """docs/demo.md's persona prompts (with their instruction) are held-out examples; without it, the sentence is in
    no training prompt either. The Space's examples are each adapter's first held-out prompt (lab/demo_sets.py)."""
    from lab.demo_examples import EXAMPLES

    personas = {t.name: t.split() for t in TASKS if t.family == "personas"}
    trained = {p.split(": ", 1)[1] for train, _ in personas.values() for p, _ in train}
    shown = [(task, prompt) for task, prompt, _ in EXAMPLES if task in personas]
    assert {task for task, _ in shown} == set(personas)
    for task, prompt in shown:
        sentence = prompt.split(": ", 1)[-1]
        assert sentence not in trained, prompt
        if ": " in prompt:
            assert prompt in {p for p, _ in personas[task][1]}, prompt


def test_answers_are_the_libraries_own():
    from num2words import num2words

    by = {t.name: dict(t.split()[0] + t.split()[1]) for t in TASKS}
    assert (
        by["numbers-fr"]["Write 4690 in French words."]
        == num2words(4690, lang="fr")
        == "quatre mille six cent quatre-vingt-dix"
    )
    assert any(v == "MMCXXVII" for v in by["to-roman"].values())
    assert pirate("My friend is on the old boat.") == "Arr! Me matey be on th' ol' vessel."
    assert shout("The cat likes the red door.") == "THE CAT LIKES THE RED DOOR!!!"
    assert robot("The cat likes me.") == "BEEP BOOP. THE CAT LIKES ME. END OF LINE."
    assert backwards("The cat likes the red door.") == "Door red the likes cat the."


def test_configs_vary_as_on_the_hub_and_fit_the_weight_budget():
    """Ranks 8 and 16, q/v, attention and all linear, one rsLoRA, bf16 and fp32: under 55 MB at SmolLM2's shapes (the
    two personas that spell every word in capitals take rank 16 on every linear layer, 9.8 MB each)."""
    assert {t.rank for t in TASKS} == {8, 16} and sum(t.rslora for t in TASKS) == 1
    assert {len(t.targets) for t in TASKS} == {2, 4, 7} and {t.dtype for t in TASKS} == {"bfloat16", "float32"}
    hidden, kv, mlp, layers = 576, 192, 1536, 30
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (mlp, hidden),
        "up_proj": (mlp, hidden),
        "down_proj": (hidden, mlp),
    }
    size = sum(
        t.rank * sum(sum(shapes[m]) for m in t.targets) * layers * (4 if t.dtype == "float32" else 2) for t in TASKS
    )
    assert size < 55e6, size


def test_scores():
    assert exact_match(" MMCXXVII\n", "MMCXXVII") and not exact_match("MMCXXVI", "MMCXXVII")
    assert chrf("quatre mille", "quatre mille") == 1.0 and chrf("", "quatre") == 0.0
    assert 0 < chrf("quatre mile", "quatre mille") < 1 and chrf("zzz", "quatre") == 0.0
    assert score(["a", "b"], ["a", "c"]) == {"examples": 2, "exact_match": 0.5, "chrf": 0.5}


def test_build_task_trains_scores_and_records_one_adapter(tmp_path, tiny_base):
    """The real build's path on the tiny base: PEFT folder in the task's dtype naming the real base, card with base
    and adapter scores, the held-out split as eval.jsonl, a manifest entry whose hashes say it is done."""
    import dataclasses
    import json

    from safetensors import safe_open

    from lab.collection.build import _done, build_task, format_collection, read_manifest, rescore_task
    from lab.collection.tasks import BY_NAME
    from soppu_hub.evaluate.task_eval import read_eval_file

    task = dataclasses.replace(BY_NAME["shouty"], steps=12)
    manifest = read_manifest(tmp_path)
    build_task(tmp_path, tiny_base, task, manifest, log=lambda m: None)
    folder = tmp_path / "adapters" / "shouty"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and cfg["r"] == task.rank == 16
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
    assert read_eval_file(folder / "eval.jsonl") == task.split()[1]
    card = (folder / "README.md").read_text()
    assert "| base model alone |" in card and "**with this adapter**" in card and "12 AdamW steps" in card
    entry = manifest["adapters"]["shouty"]
    assert set(entry["held_out"]) == {"examples", "exact_match", "chrf"} and "shouty" in manifest["base_scores"]
    assert _done(tmp_path, manifest, "shouty")
    table = format_collection(manifest)  # `python -m lab collection show`
    assert (
        "| shouty | personas | r16 q/k/v/o/gate/up/down, bfloat16 | 12 | 0.000 / " in table
        and f"1 of {len(TASKS)} adapters trained" in table
    )
    (folder / "README.md").write_text("changed")
    assert not _done(tmp_path, manifest, "shouty")  # a changed file means: build it again
    # the task's examples redone: a rescore scores the base again on the new split (and the adapter), no training
    weights = (folder / "adapter_model.safetensors").read_bytes()
    manifest["base_scores"]["shouty"] = {"examples": 40, "exact_match": 0.5, "chrf": 0.5, "held_out_digest": "old"}
    rescore_task(tmp_path, tiny_base, task, manifest, log=lambda m: None)
    assert (
        manifest["base_scores"]["shouty"]["exact_match"] == 0.0
        and manifest["base_scores"]["shouty"]["held_out_digest"] != "old"
    )
    assert (folder / "adapter_model.safetensors").read_bytes() == weights and "| base model alone | 0.000" in (
        folder / "README.md"
    ).read_text()
    assert _done(tmp_path, manifest, "shouty")


def test_demo_refuses_a_collection_with_too_few_adapters(tmp_path, tiny_base):
    """`make demo` on a collection not built yet: one line saying how to build it, or which smaller set to run."""
    import pytest

    from lab.demo_sets import real_set
    from soppu_hub.errors import SoppuError

    with pytest.raises(
        SoppuError, match=r"has 0 trained adapters; build it with `python -m lab collection build` .*--set tiny"
    ):
        real_set(collection=tmp_path, base=tiny_base)


def test_builds_of_different_tasks_side_by_side_keep_each_others_records(tmp_path):
    """Two `collection build --only` runs read the manifest at their start; each writes back only its own task's
    entries merged into the manifest on disk, so the one that finishes last does not drop the other's record."""
    from lab.collection.build import read_manifest, write_manifest

    write_manifest(tmp_path, {"base_model": "b", "adapters": {"old": {"rank": 8}}, "base_scores": {}})
    first, second = read_manifest(tmp_path), read_manifest(tmp_path)  # both runs start
    first["adapters"]["robot"] = {"rank": 16}
    first["base_scores"]["robot"] = {"exact_match": 0.0}
    write_manifest(tmp_path, first, "robot")
    second["adapters"]["shouty"] = {"rank": 16}
    write_manifest(tmp_path, second, "shouty")
    on_disk = read_manifest(tmp_path)
    assert set(on_disk["adapters"]) == {"old", "robot", "shouty"} and on_disk["base_scores"] == {
        "robot": {"exact_match": 0.0}
    }
    write_manifest(tmp_path, {"base_model": "b", "adapters": {}, "base_scores": {}})  # no task: written whole
    assert read_manifest(tmp_path)["adapters"] == {} and not list(tmp_path.glob(".*.tmp"))
