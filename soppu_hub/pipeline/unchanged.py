"""Whether a rerun changes what a repo holds, beyond float noise.

The same command on a machine with another core count fits the same adapters, but BLAS reductions split
differently, so the factors come out with other signs and last bits: byte for byte every tensor file differs while
every adapter is the same. A rerun compares what it would push with what the repo holds and pushes nothing when
the difference is that noise: every module's delta (B A of the PEFT export, U S V^T + X Y of the bundle) within
DELTA_TOL relative, other tensors within it elementwise, text files equal once their numbers (within
NUMBER_TOL) and content hashes are set aside, plots drawn from those numbers. A collection member's slice names
bases held elsewhere: its export stands for it, and a collection whose members are all the same is not published
again (`collection_unchanged`).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from ..compression.bundle import load_bundle
from ..peft_format.layout import BUNDLE_DIR

DELTA_TOL = 2e-3  # relative Frobenius difference of a module's delta that is float noise: ~1e-7 in float32, but a bf16
# or quantized store (bf16: any mixed set) turns it into rounding flips, up to 6.4e-4 measured; 1% is a real change
NUMBER_TOL = 1e-3  # relative difference of a number in a card or report that is the same number
NUMBER_FLOOR = 1e-6  # absolute: errors of an exact fit (1e-8 and such) are round-off whatever their ratio
TOKEN = re.compile(r"\b[0-9a-f]{12,64}\b|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
PEFT_WEIGHTS = "adapter_model.safetensors"


def same_adapter(
    folder: Path, repo_id: str, changed: list[str], *, token: str | bool | None = None, member: bool = False
) -> bool:
    """True when every file of `changed` (those whose bytes differ from the repo's) differs only by float noise.

    `member`: a collection member, whose bundle slice holds cores for bases kept in the collection: its PEFT export
    (the same bases times the same cores) stands for it."""
    from ..hub.pull import download_files

    if not changed or any(not p.endswith((".safetensors", ".json", ".md", ".png")) for p in changed):
        return False
    patterns = [*changed, f"{BUNDLE_DIR}/*"]
    with tempfile.TemporaryDirectory(prefix="soppu-rerun-") as tmp:
        try:
            remote = download_files(repo_id, patterns, Path(tmp), token=token)
        except Exception:  # noqa: BLE001 - cannot compare: push, as without this check
            return False
        for path in changed:
            if path.endswith(".png"):
                continue  # drawn from the numbers the texts and tensors hold
            ours, theirs = folder / path, remote / path
            if path.endswith(".safetensors") and ours.parent.name == BUNDLE_DIR:
                ok = member and (folder / PEFT_WEIGHTS).is_file() or _same_bundle(ours.parent, theirs.parent)
            elif path.endswith(".safetensors"):
                ok = _same_tensors(ours, theirs)
            else:
                ok = _same_text(ours.read_text(), theirs.read_text())
            if not ok:
                return False
    return True


def _relative(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float((x - y).norm() / y.norm().clamp_min(1e-300)) if y.norm() > 0 else float(x.norm())


def _same_tensors(ours: Path, theirs: Path) -> bool:
    """A PEFT file: the same keys, shapes and dtypes; each module's B A within DELTA_TOL, other tensors likewise."""
    from safetensors.torch import load_file

    a, b = load_file(str(ours)), load_file(str(theirs))
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape or a[k].dtype != b[k].dtype for k in a):
        return False
    for k in a:
        if ".lora_A." in k and k.replace(".lora_A.", ".lora_B.") in a:
            kb = k.replace(".lora_A.", ".lora_B.")
            if _relative(a[kb].double() @ a[k].double(), b[kb].double() @ b[k].double()) > DELTA_TOL:
                return False
        elif ".lora_B." not in k and _relative(a[k], b[k]) > DELTA_TOL:
            return False
    return True


def _same_bundle(ours: Path, theirs: Path) -> bool:
    """A repo's bundle slice with its bases: every adapter's delta per module within DELTA_TOL."""
    try:
        x, y = load_bundle(ours), load_bundle(theirs)
    except Exception:  # noqa: BLE001 - a member slice (bases elsewhere) or anything unreadable: not the same
        return False
    if x.adapters != y.adapters or x.modules.keys() != y.modules.keys():
        return False
    for i in range(len(x.adapters)):
        fx, fy = x.factors(i), y.factors(i)
        if fx.keys() != fy.keys():
            return False
        for name, (B, A) in fx.items():
            if _relative(B.double() @ A.double(), fy[name][0].double() @ fy[name][1].double()) > DELTA_TOL:
                return False
    return True


def _same_text(ours: str, theirs: str) -> bool:
    """Equal once numbers and hex ids are set aside, and every number within NUMBER_TOL (or NUMBER_FLOOR) of its
    counterpart."""
    if TOKEN.sub("#", ours) != TOKEN.sub("#", theirs):
        return False
    for p, q in zip(TOKEN.findall(ours), TOKEN.findall(theirs)):
        if p == q:
            continue
        try:
            u, v = float(p), float(q)
        except ValueError:
            continue  # a content hash (basis id): the tensors it names are compared above
        if abs(u - v) > NUMBER_TOL * max(abs(u), abs(v)) + NUMBER_FLOOR:
            return False
    return True


def collection_unchanged(
    folder: Path, names: list[str], targets: list[str], collection: str, *, token: str | bool | None = None
) -> bool:
    """Whether a --collection rerun changes nothing but float noise: the collection on the Hub lists exactly these
    member repos, and each holds the same adapter (its bundle then names the collection's last publish, as the
    Hub's copy does). A collection is published again only when some member really changed."""
    from ..collection.publish import existing_members, last_publish, name_revision
    from ..hub.collection import repo_exists
    from ..hub.push import changed_files

    if not repo_exists(collection, token=token):
        return False
    if sorted(m.repo_id or "" for m in existing_members(collection, token=token)) != sorted(targets):
        return False
    sha = last_publish(collection, token=token)
    for name, repo_id in zip(names, targets):
        name_revision(folder / name / BUNDLE_DIR, sha)
        changed = changed_files(folder / name, repo_id, token=token)  # None: no such repo, or other file names
        if changed is None or changed and not same_adapter(folder / name, repo_id, changed, token=token, member=True):
            return False
    return True
