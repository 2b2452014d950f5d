"""--eval-file and --probe-file: the user's own examples scored for base, original and compressed adapter."""

import json

import pytest

from soppu_hub.cards.render import table_cell
from soppu_hub.cli import main
from soppu_hub.errors import EvalFileError
from soppu_hub.evaluate.task_eval import eval_sets, read_eval_file, read_probe_file


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "rows, message",
    [
        (["not json"], ":1: not JSON"),
        (
            [{"prompt": "a", "answer": "b"}, {"prompt": "c"}],
            ':2: needs a non-empty string "prompt" and a string "answer"',
        ),
        ([{"prompt": " ", "answer": "b"}], ":1: needs a non-empty"),
        ([[1, 2]], ":1: needs a non-empty"),
        (["", "  "], "has no examples"),
    ],
)
def test_bad_eval_files_name_the_file_and_line(tmp_path, rows, message):
    path = _jsonl(tmp_path / "eval.jsonl", rows)
    with pytest.raises(EvalFileError, match=message) as e:
        read_eval_file(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_one_file_for_all_or_a_folder_per_adapter(tmp_path):
    pairs = [{"prompt": "Hello!", "answer": "Hi."}]
    one = _jsonl(tmp_path / "all.jsonl", pairs)
    assert eval_sets(one, ["a", "b"]) == [[("Hello!", "Hi.")]] * 2
    folder = tmp_path / "per"
    folder.mkdir()
    _jsonl(folder / "b.jsonl", pairs)
    assert eval_sets(folder, ["a", "b"]) == [None, [("Hello!", "Hi.")]]
    with pytest.raises(EvalFileError, match="has no <adapter>.jsonl for any of the adapters"):
        eval_sets(folder, ["x", "y"])
    with pytest.raises(EvalFileError, match="cannot read eval file"):
        eval_sets(tmp_path / "missing.jsonl", ["a"])
    assert read_probe_file(_jsonl(tmp_path / "p.txt", ["one", "", "two"])) == ["one", "two"]
    assert read_probe_file(_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])) == ["x"]


def test_scores_in_report_and_card_lossless_keeps_everything(tmp_path, sample_adapters, tiny_base):
    """At a rank that holds both adapters exactly the compressed adapter answers as the original does."""
    examples = _jsonl(
        tmp_path / "eval.jsonl",
        [
            {"prompt": p, "answer": "I am fine, thank you."}
            for p in ("Hello!", "How are you today?", "What is the capital of France?")
        ],
    )
    probes = _jsonl(tmp_path / "probes.txt", ["The quick brown fox", "A user asks a question"])
    out = tmp_path / "out"
    assert (
        main(
            [
                "compress",
                *map(str, sample_adapters),
                "--rank",
                "16",
                "--out",
                str(out),
                "--quiet",
                "--no-push",
                "--eval-file",
                str(examples),
                "--verify",
                "--probe-file",
                str(probes),
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    for entry in report["adapters"]:
        t = entry["task_eval"]
        assert (
            t["examples"] == 3
            and t["compressed"] == t["original"]
            and set(t["base"]) == {"examples", "exact_match", "chrf"}
        )
        assert t["chrf_retention"] in (1.0, None) and entry["verify"]["prompts"] == 2
        assert [x["prompt"] for x in t["samples"]] == ["Hello!", "How are you today?", "What is the capital of France?"]
        assert all(x["original"] == x["compressed"] and x["answer"] == "I am fine, thank you." for x in t["samples"])
    card = (out / sample_adapters[0].name / "README.md").read_text()
    assert "On your 3 examples the compressed adapter" in card and "| original adapter |" in card
    said = report["adapters"][0]["task_eval"]["samples"][0]["compressed"]
    row = f"| Hello! | I am fine, thank you. | {table_cell(said)} | {table_cell(said)} |"
    assert "Replies to the first 3 examples:" in card and row in card, card


def test_bad_eval_file_stops_before_anything_is_written(tmp_path, sample_adapters, capsys):
    bad = _jsonl(tmp_path / "eval.jsonl", [{"prompt": "a", "answer": "b"}, "{oops"])
    out = tmp_path / "out"
    assert main(["compress", *map(str, sample_adapters), "--out", str(out), "--no-push", "--eval-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}:2: not JSON" in err and not out.exists()
    assert main(["compress", *map(str, sample_adapters), "--out", str(out), "--no-push", "--probe-file", str(bad)]) == 2
    assert "--probe-file needs --verify" in capsys.readouterr().err and not out.exists()
