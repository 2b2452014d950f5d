"""All Hub traffic: sources, downloads, write access, one commit per repo, listings, cards, chat templates.

Everything goes through huggingface_hub, so HF_ENDPOINT, HF_TOKEN / `hf auth login`, the cache and
private repos work as they do for any Hub tool. Tokens are never put into messages.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from .errors import SoppuError
from .peft_format.layout import (
    BIN_NAME,
    BUNDLE_DIR,
    BUNDLE_HEADER,
    BUNDLE_WEIGHTS,
    CARD_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
)

ADAPTER_FILES = [CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME, CARD_NAME]
BUNDLE_FILES = [f"{BUNDLE_DIR}/{BUNDLE_HEADER}", f"{BUNDLE_DIR}/{BUNDLE_WEIGHTS}"]
T = TypeVar("T")


class HubError(SoppuError):
    """A Hub operation failed in a way the user can fix (not found, no access, offline...). `reason` says which,
    in a few words fit for any audience (a server relays it instead of the CLI's advice)."""

    def __init__(self, message: str, reason: str = "the Hub refused the request") -> None:
        super().__init__(message)
        self.reason = reason


class PushError(SoppuError):
    """Some repos were pushed and some were not; the message lists both."""


@dataclass
class Source:
    """Where one input adapter comes from: a local folder, or a Hub repo at a revision."""

    text: str
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def name(self) -> str:
        return (self.repo_id.split("/")[1] if self.repo_id else self.path.name) if (self.repo_id or self.path) else self.text


def is_repo_id(text: str) -> bool:
    """`owner/name` as the Hub spells it (huggingface_hub's own rule), never a path or a URL."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.count("/") != 1 or text.startswith((".", "/", "~")) or "\\" in text or "://" in text:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def parse_source(text: str, revision: str | None = None) -> Source:
    """A local folder if one exists at that path, else `owner/name[@revision]`."""
    path = Path(text).expanduser()
    if path.exists():
        return Source(text, path=path)
    repo, _, rev = text.partition("@")
    if not is_repo_id(repo) or (_ and not rev) or any(c.isspace() or c == "@" for c in rev):
        raise SoppuError(f"{text}: not an existing folder and not a Hub repo id; give a PEFT adapter folder or owner/name[@revision]")
    return Source(text, repo_id=repo, revision=rev or revision)


def _retry(fn: Callable[[], T], what: str, attempts: int = 3, wait: float = 1.0) -> T:
    """Retry transient failures (connection errors, timeouts, 5xx), then stop with a clear message."""
    import requests
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    for i in range(attempts):
        try:
            return fn()
        except (requests.ConnectionError, requests.Timeout) as e:
            reason = type(e).__name__
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status is None or status < 500:
                raise
            reason = f"HTTP {status}"
        if i + 1 < attempts:
            time.sleep(wait * 2**i)
    raise HubError(f"{what}: cannot reach the Hub at {constants.ENDPOINT} ({reason}, {attempts} tries); "
                   "check your network or HF_ENDPOINT and try again", "the Hub cannot be reached")


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


def download_adapter(repo_id: str, *, revision: str | None = None, token: str | bool | None = None,
                     with_bundle: bool = False) -> Path:
    """Snapshot only what a LoRA needs (and its soppu bundle slice if asked) into the cache; return the folder."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        folder = Path(_retry(lambda: snapshot_download(
            repo_id, revision=revision, token=token, allow_patterns=ADAPTER_FILES + (BUNDLE_FILES if with_bundle else []),
            tqdm_class=_silent_tqdm()), what))
        if not (folder / CONFIG_NAME).is_file():
            raise HubError(f"{what}: is {_describe_repo(repo_id, revision, token)}; pass a LoRA adapter repo",
                           "it is not a LoRA adapter repo")
        return folder
    except GatedRepoError:
        raise HubError(f"{what}: the repo is gated; accept its terms on the Hub and log in (hf auth login or HF_TOKEN)",
                       "the repo is gated") from None
    except RevisionNotFoundError:
        raise HubError(f"{what}: revision {revision!r} does not exist in {repo_id}; check the branch, tag or commit",
                       f"revision {revision!r} does not exist") from None
    except RepositoryNotFoundError:
        api = HfApi(token=token)
        for kind in ("dataset", "space"):
            try:
                if api.repo_exists(repo_id, repo_type=kind):
                    raise HubError(f"{what}: is a {kind} repo, not a model; pass a LoRA adapter model repo",
                                   f"it is a {kind} repo, not a LoRA adapter") from None
            except HfHubHTTPError:
                pass
        raise HubError(f"{what}: repo not found, or private and your token cannot see it; check the id or log in "
                       "(hf auth login or HF_TOKEN)", "not found on the Hub, or private") from None
    except LocalEntryNotFoundError:
        raise HubError(f"{what}: cannot reach the Hub at {constants.ENDPOINT} and it is not in the local cache; "
                       "check your network or HF_ENDPOINT", "the Hub cannot be reached") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise HubError(f"{what}: the Hub answered HTTP {status}; check your token and the repo id",
                       f"the Hub answered HTTP {status}") from None


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
        return Path(_retry(lambda: snapshot_download(
            name_or_path, revision=revision, token=token,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]), name_or_path))
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise HubError(f"{name_or_path}: model not found on the Hub (or private); check the id or log in") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise HubError(f"{name_or_path}: the Hub answered HTTP {status} while downloading the model") from None


def whoami(token: str | bool | None) -> tuple[str, set[str]]:
    """(user name, namespaces the token may write to). Fails clearly without a valid token."""
    import requests
    from huggingface_hub import HfApi
    from huggingface_hub.errors import LocalTokenNotFoundError

    try:
        info = _retry(lambda: HfApi(token=token).whoami(), "whoami")
    except LocalTokenNotFoundError:
        raise HubError("pushing needs a Hub token: run `hf auth login` or set HF_TOKEN (or pass --no-push)") from None
    except requests.HTTPError:  # HfHubHTTPError subclasses it; whoami raises the plain one on 401
        raise HubError("the Hub token was refused: log in again (hf auth login) or fix HF_TOKEN") from None
    writable = {info["name"]}
    for org in info.get("orgs") or []:
        if org.get("roleInOrg", "write") in ("admin", "write", "contributor"):
            writable.add(org["name"])
    return info["name"], writable


def target_repo_ids(names: list[str], *, user: str, push_to: str | None = None, namespace: str | None = None) -> list[str]:
    """`<user>/<name>-soppu` by default; --push-to names the one repo; --namespace picks an org."""
    if push_to:
        if len(names) != 1:
            raise SoppuError(f"--push-to names one repo but {len(names)} adapters were given; use --namespace for many")
        if not is_repo_id(push_to):
            raise SoppuError(f"--push-to {push_to!r} is not a repo id; use owner/name")
        return [push_to]
    ns = namespace or user
    return [f"{ns}/{n}-soppu" for n in names]


def check_write_access(repo_ids: list[str], writable: set[str], user: str) -> None:
    for repo_id in repo_ids:
        ns = repo_id.split("/")[0]
        if ns not in writable:
            raise HubError(f"your token (user {user}) cannot write to the namespace {ns!r} for {repo_id}; "
                           f"push to one of {', '.join(sorted(writable))} with --namespace or --push-to")


def _local_ids(path: Path) -> tuple[str, str]:
    """(git blob sha1, sha256) of a file, as the Hub names regular and LFS files."""
    import hashlib

    from huggingface_hub.utils.sha import git_hash

    data = path.read_bytes()
    return git_hash(data), hashlib.sha256(data).hexdigest()


def unchanged_on_hub(folder: Path, repo_id: str, *, token: str | bool | None = None) -> bool:
    """True when the repo already holds every file of `folder` byte for byte (card, report and plots included;
    run timings are kept out of them) and no other file: a rerun then has nothing to push for it."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        tree = _retry(lambda: list(HfApi(token=token).list_repo_tree(repo_id, recursive=True)), f"list {repo_id}")
    except RepositoryNotFoundError:
        return False
    remote = {f.path: (f.lfs.sha256 if getattr(f, "lfs", None) else f.blob_id) for f in tree
              if hasattr(f, "blob_id") and f.path != ".gitattributes"}
    local = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    if set(remote) != set(local):
        return False
    return all(remote[k] in _local_ids(path) for k, path in local.items())


def push_folder(folder: Path, repo_id: str, *, private: bool = False, token: str | bool | None = None,
                commit_message: str = "Upload soppu-compressed adapter", skip_unchanged: bool = False) -> str | None:
    """Create the repo if needed and put the whole folder in ONE commit (stale files deleted in it too).
    With `skip_unchanged`, a repo that already holds this adapter is left alone (returns None)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    if skip_unchanged and unchanged_on_hub(folder, repo_id, token=token):
        return None
    api = HfApi(token=token)
    _retry(lambda: api.create_repo(repo_id, private=private, exist_ok=True), f"create {repo_id}")
    local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    remote = _retry(lambda: api.list_repo_files(repo_id), f"list {repo_id}")
    ops: list = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in local]
    ops += [CommitOperationDelete(path_in_repo=p) for p in remote if p not in local and p != ".gitattributes"]
    info = api.create_commit(repo_id, ops, commit_message=commit_message)
    return info.commit_url


def list_adapter_repos(author: str, *, base_model: str | None = None, token: str | bool | None = None,
                       workers: int = 8) -> list[str]:
    """Every LoRA adapter repo of a user or organisation (optionally for one base model), soppu outputs excluded:
    list_models, then each repo's adapter_config.json, read with bounded parallelism."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        models = _retry(lambda: list(HfApi(token=token).list_models(author=author)), f"list {author}")
    except HfHubHTTPError as e:
        raise HubError(f"cannot list the repos of {author} (HTTP {e.response.status_code if e.response is not None else '?'})") from None
    ids = [m.id for m in models if "soppu" not in (m.tags or [])]

    def lora_config(repo_id: str) -> dict | None:
        try:
            return json.loads(Path(hf_hub_download(repo_id, CONFIG_NAME, token=token)).read_text())
        except (HfHubHTTPError, OSError, ValueError):
            return None  # no adapter_config.json (a model, a dataset card...), or not readable to us

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        configs = list(pool.map(lora_config, ids))
    found = [r for r, c in zip(ids, configs) if isinstance(c, dict) and str(c.get("peft_type", "")).upper() == "LORA"
             and (base_model is None or c.get("base_model_name_or_path") == base_model)]
    if not found:
        what = f" for {base_model}" if base_model else ""
        raise HubError(f"{author} has no LoRA adapter repos{what} that this token can read ({len(ids)} repos listed); "
                       "check the user or organisation name, or name the adapters directly")
    return found


@contextmanager
def endpoint(url: str) -> Iterator[None]:
    """huggingface_hub parses commit URLs against its process-wide endpoint: point it at `url`, then restore it."""
    from huggingface_hub import constants

    saved = constants.ENDPOINT
    constants.ENDPOINT = url
    try:
        yield
    finally:
        constants.ENDPOINT = saved


def list_tagged(tag: str, *, author: str | None = None, token: str | bool | None = None, limit: int = 200) -> list[str]:
    """Model repo ids carrying `tag` (optionally one author's), in the Hub's listing order."""
    from huggingface_hub import HfApi

    try:
        return [m.id for m in HfApi(token=token).list_models(filter=tag, author=author or None, limit=limit)]
    except Exception as e:  # a listing is a convenience: say it failed, in words
        raise HubError(f"cannot list the Hub's {tag} models ({type(e).__name__})", "the Hub cannot be listed") from None


def card_metadata(repo_id: str, *, token: str | bool | None = None) -> dict:
    """The YAML metadata of a repo's model card."""
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        return ModelCard.load(repo_id, token=token).data.to_dict()
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id} is not on the Hub (or it is private)", "not found on the Hub, or private") from None
    except EntryNotFoundError:
        raise HubError(f"{repo_id} has no model card", "it has no model card") from None
    except Exception:  # network and anything else: said in words, once
        raise HubError(f"the card of {repo_id} cannot be read from the Hub right now", "the Hub cannot be reached") from None


def fetch_file(repo_id: str, filename: str, *, revision: str | None = None, token: str | bool | None = None) -> Path | None:
    """One file of a repo from the cache or the Hub; None when it is not there (or cannot be fetched now)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token))
    except Exception:
        return None


def chat_template(model_id: str, *, token: str | bool | None = None) -> tuple[str | None, dict[str, str]]:
    """A base model's chat template from its tokenizer_config.json (or chat_template.jinja beside it), with the
    bos / eos token texts templates refer to; (None, {}) when it has none."""
    import json

    path = fetch_file(model_id, "tokenizer_config.json", token=token)
    if path is None:
        return None, {}
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, {}
    specials = {}
    for key in ("bos_token", "eos_token"):
        tok = cfg.get(key)
        specials[key] = tok.get("content", "") if isinstance(tok, dict) else (tok or "")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:  # transformers >= 4.43 saves it beside the config instead
        jinja = fetch_file(model_id, "chat_template.jinja", token=token)
        template = jinja.read_text() if jinja else None
    return template, specials
