"""Reading a bundle back: every damaged bundle is a one-line BundleError that says what to do, never a traceback."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from soppu_hub.cli import main
from soppu_hub.compression.bundle import load_bundle
from soppu_hub.errors import BundleError
from soppu_hub.peft_format.layout import BUNDLE_HEADER, BUNDLE_WEIGHTS


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, sample_adapters):
    out = tmp_path_factory.mktemp("bundle") / "out"
    assert main(["compress", *map(str, sample_adapters), "--rank", "4", "--out", str(out), "--quiet", "--no-push"]) == 0
    return out / "bundle"


def _header(folder, fn):
    h = json.loads((folder / BUNDLE_HEADER).read_text())
    h = fn(h)
    (folder / BUNDLE_HEADER).write_text(json.dumps(h))


def _tensors(folder, fn):
    t = load_file(str(folder / BUNDLE_WEIGHTS))
    fn(t)
    save_file(t, str(folder / BUNDLE_WEIGHTS))


def _first_module(folder) -> str:
    return next(iter(json.loads((folder / BUNDLE_HEADER).read_text())["modules"]))


DAMAGE = {
    "no header": (lambda f: (f / BUNDLE_HEADER).unlink(), "is not a soppu bundle (missing bundle.json)"),
    "no weights": (lambda f: (f / BUNDLE_WEIGHTS).unlink(), "is not a soppu bundle (missing bundle.safetensors)"),
    "header not JSON": (lambda f: (f / BUNDLE_HEADER).write_text("{nope"), "bundle cannot be read"),
    "weights truncated": (
        lambda f: (f / BUNDLE_WEIGHTS).write_bytes((f / BUNDLE_WEIGHTS).read_bytes()[:-64]),
        "bundle cannot be read",
    ),
    "header a list": (lambda f: (f / BUNDLE_HEADER).write_text("[]"), "is not a soppu-bundle header"),
    "other format": (lambda f: _header(f, lambda h: h | {"format": "zip"}), "is not a soppu-bundle header"),
    "newer version": (lambda f: _header(f, lambda h: h | {"version": 99}), "upgrade soppu-hub"),
    "no adapters": (lambda f: _header(f, lambda h: {k: v for k, v in h.items() if k != "adapters"}), "is incomplete"),
    "no modules": (lambda f: _header(f, lambda h: {k: v for k, v in h.items() if k != "modules"}), "is incomplete"),
    "module tensors missing": (lambda f: _tensors(f, lambda t: t.pop(f"{_first_module(f)}.U")), "tensors for module"),
    "cores of the wrong rank": (
        lambda f: _tensors(f, lambda t: t.__setitem__(f"{_first_module(f)}.cores", torch.zeros(2, 3, 3))),
        "is corrupt",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_bundles_are_one_line_errors(tmp_path, bundle_dir, case):
    import shutil

    folder = tmp_path / "bundle"
    shutil.copytree(bundle_dir, folder)
    damage, expected = DAMAGE[case]
    damage(folder)
    with pytest.raises(BundleError) as err:
        load_bundle(folder)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_intact_bundle_loads_and_unknown_adapter_is_named(bundle_dir, sample_adapters):
    bundle = load_bundle(bundle_dir)
    assert bundle.adapters == [p.name for p in sample_adapters]
    with pytest.raises(BundleError) as err:
        bundle.index("nobody")
    assert "'nobody' is not in this bundle (it holds support-bot, pirate-talk)" in str(err.value)
