"""The layout docs/architecture.md draws: subpackages that stand alone, imports in one direction, files one can read."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import soppu_hub

ROOT = Path(soppu_hub.__file__).parent
MODULES = {
    ".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p for p in ROOT.rglob("*.py")
}
SUBPACKAGES = sorted(m for m, p in MODULES.items() if p.name == "__init__.py" and m.count(".") == 1)


def imports(module: str) -> set[str]:
    """soppu_hub modules `module` imports, at the top or inside functions (a lazy import is still a dependency)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            for alias in node.names:  # `from . import x` may name a module
                out.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in MODULES and m != module}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(n, path):
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path + [n, m]
            if m not in state and (found := visit(m, path + [n])):
                return found
        state[n] = 2
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n, []))), None)


def test_no_module_imports_itself_back():
    assert _cycle({m: imports(m) for m in MODULES}) is None


def test_subpackages_depend_on_each_other_in_one_direction():
    def top(m):
        return ".".join(m.split(".")[:2])

    graph = {}
    for m in MODULES:
        graph.setdefault(top(m), set()).update(top(t) for t in imports(m) if top(t) != top(m) and t != "soppu_hub")
    assert _cycle(graph) is None, graph


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_each_subpackage_imports_alone_and_says_what_it_owns(package):
    res = subprocess.run(
        [sys.executable, "-c", f"import {package}, sys; print({package}.__doc__)"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() not in ("", "None")


def test_every_module_has_a_docstring_and_is_readable_in_one_sitting():
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree) or path.name == "__main__.py", module
        assert len(path.read_text().splitlines()) <= 400, f"{module} has grown past 400 lines: split it"


def test_the_kernel_imports_only_torch_and_compression_never_imports_servers():
    pure_modules = (
        ("compression.jd", {"scoring"}),
        ("compression.scoring", set()),  # the kernel and its error formulas
        ("collection.project", {"compression"}),
    )  # a joiner's projection: the same formulas, no I/O
    for pure, allowed in pure_modules:
        kernel = ast.parse(MODULES[f"soppu_hub.{pure}"].read_text())
        names = {a.name.split(".")[0] for n in ast.walk(kernel) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(kernel) if isinstance(n, ast.ImportFrom) and n.module}
        assert names <= {"torch", "__future__", "dataclasses", "math", "collections"} | allowed, (pure, names)
    for m in MODULES:
        if m.startswith(("soppu_hub.compression", "soppu_hub.pipeline", "soppu_hub.peft_format", "soppu_hub.cards")):
            assert not {t for t in imports(m) if t.startswith(("soppu_hub.serve", "soppu_hub.hubserver"))}, m


def test_card_workers_load_no_torch():
    """Card-drawing workers are spawned: they import the main module again and the card code, nothing heavier."""
    code = (
        "import sys, soppu_hub.__main__, soppu_hub.cards.write; "
        "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


REPO = ROOT.parent
LAB = {
    ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
    for p in (REPO / "lab").rglob("*.py")
}


def _top_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}


def test_the_product_never_imports_the_lab():
    """lab/ imports soppu_hub, never the reverse: the wheel does not carry the lab."""
    for module, path in MODULES.items():
        assert not {n for n in _top_imports(path) if n == "lab" or n.startswith("lab.")}, module
    for module, path in LAB.items():  # and the lab reaches the product by absolute imports only
        tree = ast.parse(path.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 1], module
        assert ast.get_docstring(tree) or path.name == "__main__.py", module
        assert len(path.read_text().splitlines()) <= 400, f"{module} has grown past 400 lines: split it"


def test_the_wheel_lists_every_product_package_and_nothing_else():
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert listed == on_disk | {"soppu_hub.cards.templates"}


@pytest.mark.parametrize("argv", [["--help"], ["chat", "--help"], ["hub", "--help"]])
def test_help_answers_without_torch(argv):
    """A cold `soppu-hub --help` imports no torch (1.7 s of imports before; 0.04 s wall now on this machine)."""
    code = (
        f"import sys\nfrom soppu_hub.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules), file=sys.stderr)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stderr.strip().splitlines()[-1] == "[]", res.stderr
    assert "usage: soppu-hub" in res.stdout


HUB_DATA = {
    "ModelCard",
    "ModelCardData",
    "git_hash",
    "tqdm",
    "HFValidationError",
    "are_progress_bars_disabled",
    "disable_progress_bars",
    "enable_progress_bars",
}  # huggingface_hub names that make no request


def test_only_hub_talks_to_the_hub():
    """Outside hub/ (and the offline Hub server, which is the Hub) huggingface_hub is used for data types only."""
    for module, path in MODULES.items():
        if module.startswith(("soppu_hub.hub.", "soppu_hub.hubserver")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not [a for a in node.names if a.name.startswith("huggingface_hub")], module
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("huggingface_hub"):
                assert {a.name for a in node.names} <= HUB_DATA, (module, [a.name for a in node.names])


def test_compression_takes_folders_never_repo_ids():
    for module in MODULES:
        if module.startswith("soppu_hub.compression"):
            assert not {t for t in imports(module) if t.startswith(("soppu_hub.hub", "soppu_hub.pipeline"))}, module
