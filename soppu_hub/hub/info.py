"""What the Hub says about repos: listings by tag, card metadata, single files, a model's config, a chat template."""

from __future__ import annotations

from pathlib import Path

from .common import HubError


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
        raise HubError(
            f"the card of {repo_id} cannot be read from the Hub right now", "the Hub cannot be reached"
        ) from None


def fetch_file(
    repo_id: str, filename: str, *, revision: str | None = None, token: str | bool | None = None
) -> Path | None:
    """One file of a repo from the cache or the Hub; None when it is not there (or cannot be fetched now)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token))
    except Exception:
        return None


def model_config(
    model_id: str, *, revision: str | None = None, token: str | bool | None = None, timeout: float = 10.0
) -> dict | None:
    """A model's config.json, from a local folder, one request to the Hub, or the cache when the Hub cannot be
    reached; None when it cannot be read. One request with a short timeout, no retries: it only refines a default
    (LoRAX's shard sizes), and an
    offline machine must not wait half a minute of backoff for it."""
    import json

    from huggingface_hub import hf_hub_url, try_to_load_from_cache
    from huggingface_hub.utils import build_hf_headers, get_session

    local = Path(model_id) / "config.json"
    try:
        if local.is_file():
            return json.loads(local.read_text())
    except (OSError, ValueError):
        return None
    try:  # the Hub first: a cache keyed by "main" can hold another model published under the same id since
        r = get_session().get(
            hf_hub_url(model_id, "config.json", revision=revision),
            headers=build_hf_headers(token=token),
            timeout=timeout,
        )
        if r.status_code == 200:
            return r.json()
    except Exception:  # noqa: BLE001 - no network, not JSON: the cache, if any, is what there is
        pass
    try:
        cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
        return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None
    except Exception:  # noqa: BLE001 - an invalid id, a damaged file: the caller says it could not check
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
