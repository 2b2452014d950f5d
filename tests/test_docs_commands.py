"""Every `soppu-hub` and `python -m lab` command printed in the README and docs/ parses as printed (its flags,
choices and arguments exist), and the ones that need no network and no long job run as printed, from a folder
holding the adapters they name."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PREFIXES = {".venv/bin/soppu-hub": "soppu_hub", ".venv/bin/python -m lab": "lab"}
LOCAL = re.compile(r"^\./[\w-]+$")


def documented() -> list[tuple[str, str, list[str]]]:
    """(page:line, which CLI, argv) of each command line in a fenced block."""
    out = []
    for page in PAGES:
        fenced = False
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if line.strip().startswith("```"):
                fenced = not fenced
                continue
            text = line.strip()
            for prefix, cli in PREFIXES.items():
                if fenced and text.startswith(prefix + " "):
                    argv = shlex.split(text[len(prefix) :], comments=True)
                    out.append((f"{page.relative_to(REPO)}:{n}", cli, argv))
    return out


COMMANDS = documented()


def _parser(cli: str, argv: list[str]):
    if cli == "lab":
        from lab.cli import build_parser
    else:
        from soppu_hub.cli import build_parser
    return build_parser()


def test_the_docs_print_commands():
    assert len([c for c in COMMANDS if c[1] == "soppu_hub"]) >= 15 and len([c for c in COMMANDS if c[1] == "lab"]) >= 10


@pytest.mark.parametrize("where,cli,argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_documented_command_parses_as_printed(where, cli, argv):
    try:
        _parser(cli, argv).parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: {' '.join(argv)} does not parse (exit {e.code})")


def _offline(argv: list[str]) -> bool:
    """A compress of local folders that pushes nothing: runs here as printed."""
    return (
        argv[0] == "compress"
        and "--no-push" in argv
        and all(LOCAL.match(a) for a in argv[1 : argv.index(next(a for a in argv[1:] if a.startswith("-")))])
    )


def test_the_offline_compress_commands_run_as_printed(tmp_path, tiny_base):
    """./a ./b ./c ./my-lora ./other-lora, loras.txt and held-out.jsonl made here; each command run in that folder."""
    from lab.samples import llama_module_shapes, synthetic_factors, write_adapter

    names = ["a", "b", "c", "my-lora", "other-lora"]
    facs = synthetic_factors(llama_module_shapes(targets=("q_proj", "v_proj")), len(names), 4, shared=2, seed=5)
    for name, f in zip(names, facs):
        write_adapter(tmp_path / name, f, base_model=str(tiny_base), rank=4, alpha=8)
    (tmp_path / "loras.txt").write_text("./a\n./b\n# a comment\n./c\n")
    (tmp_path / "held-out.jsonl").write_text(json.dumps({"prompt": "Hello!", "answer": "Hi."}) + "\n")
    runs = [(where, argv) for where, cli, argv in COMMANDS if cli == "soppu_hub" and _offline(argv)]
    assert len(runs) >= 5  # README's two, usage's four and the sources-file one
    for where, argv in runs:
        res = subprocess.run(
            [sys.executable, "-m", "soppu_hub", *argv, "--quiet"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, f"{where}: {' '.join(argv)}: {res.stderr[-2000:]}"
        out = tmp_path / argv[argv.index("--out") + 1]
        assert json.loads((out / "report.json").read_text())["adapters"], where
        subprocess.run(["rm", "-rf", str(out)], check=True)
