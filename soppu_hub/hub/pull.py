"""Pull from the Hub: sources, LoRA adapter repos (only the files a LoRA needs), base models, a user's adapters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import SoppuError
from ..peft_format.layout import (
    BIN_NAME,
    BUNDLE_DIR,
    BUNDLE_HEADER,
    BUNDLE_WEIGHTS,
    CARD_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    TAG,
)
from ..progress import hold_tqdm_lock
from .common import HubError, is_repo_id, retry

ADAPTER_FILES = [CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME, CARD_NAME]
BUNDLE_FILES = [f"{BUNDLE_DIR}/{BUNDLE_HEADER}", f"{BUNDLE_DIR}/{BUNDLE_WEIGHTS}"]


@dataclass
class Source:
    """Where one input adapter comes from: a local folder, or a Hub repo at a revision."""

    text: str
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def name(self) -> str:
        return (
            (self.repo_id.split("/")[1] if self.repo_id else self.path.name)
            if (self.repo_id or self.path)
            else self.text
        )


def parse_source(text: str, revision: str | None = None) -> Source:
    """A local folder if one exists at that path, else `owner/name[@revision]`."""
    path = Path(text).expanduser()
    if path.exists():
        return Source(text, path=path)
    repo, _, rev = text.partition("@")
    if not is_repo_id(repo) or (_ and not rev) or any(c.isspace() or c == "@" for c in rev):
        raise SoppuError(
            f"{text}: not an existing folder and not a Hub repo id; give a PEFT adapter folder or owner/name[@revision]"
        )
    return Source(text, repo_id=repo, revision=rev or revision)


def _describe_repo(repo_id: str, revision: str | None, token: str | bool | None) -> str:
    """Say what a repo without adapter_config.json is, for the error message."""
    from huggingface_hub import HfApi

    files = HfApi(token=token).list_repo_files(repo_id, revision=revision)
    names = {Path(f).name for f in files}
    if "config.json" in names and any(f.endswith((".safetensors", ".bin", ".gguf")) for f in names):
        return "a full model (config.json + weights), not a LoRA adapter"
    if "tokenizer.json" in names or "tokenizer_config.json" in names:
        return "a tokenizer repo, not a LoRA adapter"
    return f"a repo without adapter_config.json (files: {', '.join(sorted(names)[:6]) or 'none'})"


def _silent_tqdm():
    """A tqdm class that shows nothing: snapshot_download's per-repo "Fetching N files" bar, which from parallel
    downloads would interleave with (and, nested, break the lines of) the CLI's one bar per phase."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Silent(hf_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def download_adapter(
    repo_id: str, *, revision: str | None = None, token: str | bool | None = None, with_bundle: bool = False
) -> Path:
    """Snapshot only what a LoRA needs (and its soppu bundle slice if asked) into the cache; return the folder."""
    from huggingface_hub import HfApi, constants, snapshot_download

    hold_tqdm_lock()  # downloads run from several threads: snapshot_download's thread_map races without it
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        folder = Path(
            retry(
                lambda: snapshot_download(
                    repo_id,
                    revision=revision,
                    token=token,
                    allow_patterns=ADAPTER_FILES + (BUNDLE_FILES if with_bundle else []),
                    tqdm_class=_silent_tqdm(),
                ),
                what,
            )
        )
        if not (folder / CONFIG_NAME).is_file():
            raise HubError(
                f"{what}: is {_describe_repo(repo_id, revision, token)}; pass a LoRA adapter repo",
                "it is not a LoRA adapter repo",
            )
        return folder
    except GatedRepoError:
        raise HubError(
            f"{what}: the repo is gated; accept its terms on the Hub and log in (hf auth login or HF_TOKEN)",
            "the repo is gated",
        ) from None
    except RevisionNotFoundError:
        raise HubError(
            f"{what}: revision {revision!r} does not exist in {repo_id}; check the branch, tag or commit",
            f"revision {revision!r} does not exist",
        ) from None
    except RepositoryNotFoundError:
        api = HfApi(token=token)
        for kind in ("dataset", "space"):
            try:
                if api.repo_exists(repo_id, repo_type=kind):
                    raise HubError(
                        f"{what}: is a {kind} repo, not a model; pass a LoRA adapter model repo",
                        f"it is a {kind} repo, not a LoRA adapter",
                    ) from None
            except HfHubHTTPError:
                pass
        raise HubError(
            f"{what}: repo not found, or private and your token cannot see it; check the id or log in "
            "(hf auth login or HF_TOKEN)",
            "not found on the Hub, or private",
        ) from None
    except LocalEntryNotFoundError:
        raise HubError(
            f"{what}: cannot reach the Hub at {constants.ENDPOINT} and it is not in the local cache; "
            "check your network or HF_ENDPOINT",
            "the Hub cannot be reached",
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise HubError(
            f"{what}: the Hub answered HTTP {status}; check your token and the repo id",
            f"the Hub answered HTTP {status}",
        ) from None


def download_files(
    repo_id: str, patterns: list[str], local_dir: Path, *, revision: str | None = None, token: str | bool | None = None
) -> Path:
    """The repo's files matching `patterns` (fnmatch) into `local_dir`, as they are at `revision`; returns it."""
    from huggingface_hub import snapshot_download

    hold_tqdm_lock()

    return Path(
        retry(
            lambda: snapshot_download(
                repo_id,
                allow_patterns=patterns,
                local_dir=local_dir,
                revision=revision,
                token=token,
                tqdm_class=_silent_tqdm(),
            ),
            f"download {repo_id}",
        )
    )


def model_folder(name_or_path: str, *, revision: str | None = None, token: str | bool | None = None) -> Path:
    """A base model: a local folder as is, a Hub id snapshotted (config, weights, tokenizer) into the cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if not is_repo_id(name_or_path):
        raise SoppuError(f"{name_or_path}: not a folder and not a Hub repo id; give a model folder or owner/name")
    try:
        return Path(
            retry(
                lambda: snapshot_download(
                    name_or_path,
                    revision=revision,
                    token=token,
                    allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
                    tqdm_class=_silent_tqdm(),
                ),
                name_or_path,
            )
        )
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise HubError(f"{name_or_path}: model not found on the Hub (or private); check the id or log in") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise HubError(f"{name_or_path}: the Hub answered HTTP {status} while downloading the model") from None


def list_adapter_repos(
    author: str, *, base_model: str | None = None, token: str | bool | None = None, workers: int = 8
) -> list[str]:
    """Every LoRA adapter repo of a user or organisation (optionally for one base model), soppu outputs excluded:
    list_models, then each repo's adapter_config.json, read with bounded parallelism."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        models = retry(lambda: list(HfApi(token=token).list_models(author=author)), f"list {author}")
    except HfHubHTTPError as e:
        raise HubError(
            f"cannot list the repos of {author} (HTTP {e.response.status_code if e.response is not None else '?'})"
        ) from None
    ids = [m.id for m in models if TAG not in (m.tags or [])]

    def lora_config(repo_id: str) -> dict | None:
        try:
            return json.loads(Path(hf_hub_download(repo_id, CONFIG_NAME, token=token)).read_text())
        except (HfHubHTTPError, OSError, ValueError):
            return None  # no adapter_config.json (a model, a dataset card...), or not readable to us

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        configs = list(pool.map(lora_config, ids))
    found = [
        r
        for r, c in zip(ids, configs)
        if isinstance(c, dict)
        and str(c.get("peft_type", "")).upper() == "LORA"
        and (base_model is None or c.get("base_model_name_or_path") == base_model)
    ]
    if not found:
        what = f" for {base_model}" if base_model else ""
        raise HubError(
            f"{author} has no LoRA adapter repos{what} that this token can read ({len(ids)} repos listed); "
            "check the user or organisation name, or name the adapters directly"
        )
    return found
