"""The committed sample collection: build it (`python -m lab samples build`), check it, and find its parts.

One folder: `tiny-llama/` (the base model and tokenizer), `adapters/<style>/` (PEFT LoRA folders), each with
a model card, and `manifest.json` (how it was built, and a sha256 per file so a changed byte is noticed).
The build writes into a scratch folder and swaps it in whole: an interrupted build leaves the old one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lab.samples.synthetic import TINY_BASE_ID
from lab.samples.texts import DIALOGUES, STYLES
from soppu_hub.errors import SoppuError

COLLECTION = Path(__file__).parent / "collection"
MANIFEST = "manifest.json"
EXAMPLE_PROMPTS = [0, 2, 10]  # indexes into DIALOGUES shown on every card


@dataclass
class BuildConfig:
    """How the collection is trained. Field metadata is the CLI help."""

    hidden: int = field(default=128, metadata={"help": "hidden size of the Llama"})
    layers: int = field(default=4, metadata={"help": "decoder layers"})
    vocab: int = field(default=1024, metadata={"help": "BPE vocabulary size"})
    base_steps: int = field(default=200, metadata={"help": "full-batch training steps of the base model"})
    adapter_steps: int = field(default=150, metadata={"help": "full-batch training steps per adapter"})
    seed: int = field(default=0, metadata={"help": "seed of the base model"})
    adapter_seed: int = field(default=42, metadata={"help": "seed set before each adapter (HF Trainer's default)"})
    threads: int = field(default=2, metadata={"help": "CPU threads (part of the recipe: float sums depend on it)"})
    styles: int = field(default=len(STYLES), metadata={"help": "how many of the styles to train (the first N)"})


@dataclass
class Collection:
    folder: Path
    manifest: dict

    @property
    def base(self) -> Path:
        return self.folder / "tiny-llama"

    @property
    def adapters(self) -> list[Path]:
        return [self.folder / "adapters" / a["name"] for a in self.manifest["adapters"]]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): _sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def load_collection(folder: str | Path = COLLECTION, *, check: bool = True) -> Collection:
    """The collection in `folder`; with check, every file's sha256 must match the manifest."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        raise SoppuError(
            f"no sample collection in {folder}; build it with `make samples` "
            f"(or .venv/bin/python -m lab samples build --out {folder})"
        ) from None
    if check:
        found = _file_hashes(folder)
        bad = sorted(k for k in set(found) | set(manifest["files"]) if found.get(k) != manifest["files"].get(k))
        if bad:
            raise SoppuError(
                f"the sample collection in {folder} differs from its manifest ({bad[0]}"
                f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); rebuild it with `make samples`"
            )
    return Collection(folder, manifest)


@contextmanager
def _deterministic(threads: int):
    """Fixed thread count and deterministic kernels for the build; the caller's settings restored after."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


@torch.no_grad()
def _examples(base: Path, adapter: Path | None, prompts: list[str], max_new_tokens: int = 48) -> list[tuple[str, str]]:
    """Greedy replies of the saved model (with the saved adapter, as a user loads it) for the card."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    out = []
    for q in prompts:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        gen = model.generate(
            input_ids=ids["input_ids"],
            attention_mask=ids["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        reply = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        out.append((q, " ".join(reply.split()).replace("|", "\\|")))  # one table cell: no newlines, no bars
    return out


def _write_card(base: Path, adapter: Path | None, template: str, **values) -> None:
    """README.md of the base (adapter None) or of an adapter: its template with the replies it gives to the example
    prompts."""
    examples = _examples(base, adapter, [DIALOGUES[i][0] for i in EXAMPLE_PROMPTS])
    (adapter or base).joinpath("README.md").write_text(_render(template, examples=examples, **values))


def _render(template: str, **values) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    from lab import CARDS

    env = Environment(loader=FileSystemLoader(str(CARDS)), undefined=StrictUndefined, keep_trailing_newline=True)
    return env.get_template(template).render(**values)


def build_collection(
    out: str | Path = COLLECTION,
    config: BuildConfig | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> Collection:
    """Train the base model and the adapters, write cards and the manifest, then swap the folder in."""
    from lab.samples.training import build_base, train_adapter

    config = config or BuildConfig()
    if not 1 <= config.styles <= len(STYLES):
        raise SoppuError(f"--styles must be between 1 and {len(STYLES)}, got {config.styles}")
    out = Path(out)
    styles = STYLES[: config.styles]
    total = config.base_steps + config.adapter_steps * len(styles)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    scratch = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    started = time.perf_counter()
    try:
        with _deterministic(config.threads):
            base = scratch / "tiny-llama"
            base_loss = build_base(
                base,
                hidden=config.hidden,
                layers=config.layers,
                vocab=config.vocab,
                steps=config.base_steps,
                seed=config.seed,
                tick=tick,
            )
            _write_card(
                base,
                None,
                "sample-base.md",
                config=config,
                loss=base_loss,
                repo_id=TINY_BASE_ID,
                dialogues=DIALOGUES,
                styles=styles,
            )
            adapters = []
            for style in styles:
                folder = scratch / "adapters" / style.name
                loss = train_adapter(
                    base,
                    style,
                    folder,
                    base_model=TINY_BASE_ID,
                    steps=config.adapter_steps,
                    seed=config.adapter_seed,
                    tick=tick,
                )
                _write_card(
                    base,
                    folder,
                    "sample-adapter.md",
                    style=style,
                    loss=loss,
                    config=config,
                    base_model=TINY_BASE_ID,
                    n_prompts=len(DIALOGUES),
                )
                adapters.append(
                    {
                        "name": style.name,
                        "summary": style.summary,
                        "rank": style.rank,
                        "alpha": style.alpha,
                        "targets": list(style.targets),
                        "dtype": style.dtype,
                        "final_loss": round(loss, 4),
                    }
                )
                log(f"trained {style.name}: loss {loss:.3f}")
        import peft
        import transformers

        manifest = {
            "base_model": TINY_BASE_ID,
            "config": asdict(config),
            "base_final_loss": round(base_loss, 4),
            "adapters": adapters,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
            "files": _file_hashes(scratch),
        }
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        log(f"built in {time.perf_counter() - started:.0f} s")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        scratch.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return load_collection(out)
