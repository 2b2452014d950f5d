"""Where a requested adapter comes from and whether this server may load it: an allowed local folder or a Hub
download, then its config checked (a LoRA, for this base)."""

from __future__ import annotations

import json
from pathlib import Path

from ..peft_format.layout import CONFIG_NAME
from .errors import AdapterLoadFailed, ValidationFailed


def adapter_folder(
    adapter_id: str, source: str, *, local_root: Path | None, api_token: str | None, with_bundle: bool
) -> Path:
    """The folder of `adapter_id`: under `local_root` only (no way out, symlinks included), or downloaded from the
    Hub (with its soppu bundle when shared bases are on); what cannot be had is a ValidationFailed or
    AdapterLoadFailed in words a client can act on."""
    if source == "local":
        if local_root is None:
            raise ValidationFailed("local adapters are disabled on this server (start it with --adapter-dir)")
        try:  # resolve() follows symlinks, so a link inside the folder that points out of it is refused too
            path = Path(adapter_id)
            path = (path if path.is_absolute() else local_root / path).resolve()
        except (OSError, ValueError):
            raise ValidationFailed(f"local adapter {adapter_id[:200]!r} is not a valid path") from None
        if path != local_root and local_root not in path.parents:
            raise ValidationFailed(f"local adapter {adapter_id!r} is outside the allowed directory")
        if not (path / CONFIG_NAME).is_file():
            raise AdapterLoadFailed(f"local adapter {adapter_id!r} has no {CONFIG_NAME}")
        return path
    from huggingface_hub.errors import HFValidationError

    from ..errors import SoppuError
    from ..hub.common import HubError
    from ..hub.pull import download_adapter

    try:
        return download_adapter(adapter_id, token=api_token or None, with_bundle=with_bundle)
    except HFValidationError:
        raise ValidationFailed(
            f"adapter_id {adapter_id[:200]!r} is not a Hub repo id (owner/name); for a folder use adapter_source=local"
        ) from None
    except HubError as e:  # the reason, not the CLI's advice: whoever reads this cannot run `hf auth login` here
        raise AdapterLoadFailed(f"adapter {adapter_id} cannot be loaded: {e.reason}") from None
    except SoppuError as e:
        raise AdapterLoadFailed(f"adapter {adapter_id} cannot be loaded: {e}") from None


def check_adapter(adapter_id: str, folder: Path, accepted_bases: set[str], model_id: str) -> None:
    """A LoRA adapter trained for this server's base (one of `accepted_bases`), or AdapterLoadFailed saying why not."""
    try:
        cfg = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterLoadFailed(f"adapter {adapter_id}: unreadable {CONFIG_NAME} ({e})") from None
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise AdapterLoadFailed(f"adapter {adapter_id} is {cfg.get('peft_type')!r}, not a LoRA adapter")
    base = cfg.get("base_model_name_or_path")
    if base and base not in accepted_bases:
        raise AdapterLoadFailed(f"adapter {adapter_id} was trained for {base}, but this server runs {model_id}")
