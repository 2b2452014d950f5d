"""Adapters by name for the embedded backend: resolve (Hub or allowed local folder), check, make room, load.

Two bounds on what stays loaded, as servers budget: a number of adapters (--max-adapters) and bytes of resident
LoRA weights (--max-lora-memory). Adapters in use are never evicted, so a load that needs room while every loaded
adapter is in use waits for one to be released: the bounds hold under any burst. A preloaded collection
(resident.py) is outside both: all its members stay. The bookkeeping is `slots.Slots`, the model `peft_host.PeftHost`;
this module is the order of the steps and the refusals.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

from ..peft_format.layout import BASE_MODEL_ID, CONFIG_NAME, SAFETENSORS_NAME
from .errors import AdapterLoadFailed, ValidationFailed
from .peft_host import PeftHost, in_own_thread
from .resolve import adapter_folder, check_adapter
from .slots import Key, Slots

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
BASE_ALIASES = {"", BASE_MODEL_ID, BASE}
SOURCES = ("hub", "local")


def lora_bytes(folder: Path) -> int:
    """Bytes of an adapter folder's LoRA weights once loaded (float32), read from its safetensors header; an upper
    bound for one loaded through a shared basis, whose bases may be resident already. 0 when unreadable (the load
    itself says why)."""
    from safetensors import safe_open

    try:  # LoRA factors only, as resident_lora measures them (a saved head or embedding is not LoRA memory)
        with safe_open(str(folder / SAFETENSORS_NAME), "pt") as f:
            return sum(4 * math.prod(f.get_slice(k).get_shape()) for k in f.keys() if ".lora_" in k)
    except Exception:
        return 0


class AdapterStore:
    """Adapters by id: the Slots table says what is loaded and what may go, the PeftHost holds the model."""

    def __init__(
        self,
        base,
        model_dir: Path,
        *,
        model_id: str,
        lock: threading.RLock,
        max_adapters: int,
        local_root: Path | None,
        share_bases: bool = True,
        max_lora_bytes: int | None = None,
    ):
        """`lock` guards the model: the engine holds it while generating, the host while (un)loading."""
        self.host = PeftHost(base, lock, share_bases=share_bases)
        self.slots = Slots(max_adapters, max_lora_bytes)
        self.model_id = model_id
        self.resident_source: str | None = None  # where the resident collection came from: a reload reads it again
        self._resident_token: str | None = None
        self.preloaded: list[str] = []  # "source:id" of the adapters loaded at start (LoRAX's preloaded_adapters)
        self.local_root = local_root.resolve() if local_root else None
        self.accepted_bases = {model_id, str(model_dir), model_dir.name, str(model_dir.resolve())}

    @property
    def max_adapters(self) -> int:
        return self.slots.max_adapters

    @property
    def max_lora_bytes(self) -> int | None:
        return self.slots.max_lora_bytes

    def _folder(self, adapter_id: str, source: str, api_token: str | None) -> Path:
        return adapter_folder(
            adapter_id,
            source,
            local_root=self.local_root,
            api_token=api_token,
            with_bundle=self.host.shared is not None,
        )

    def _check(self, adapter_id: str, folder: Path) -> None:
        check_adapter(adapter_id, folder, self.accepted_bases, self.model_id)

    # --- acquire / release -------------------------------------------------------------------------
    def acquire(self, adapter_id: str | None, source: str | None, api_token: str | None) -> tuple[str, callable]:
        """Load if needed and pin; returns (PEFT adapter name, unpin)."""
        if adapter_id is None or adapter_id in BASE_ALIASES:
            return BASE, lambda: None
        resident = self.host.resident
        if resident is not None and adapter_id in resident.ids:  # always loaded, never evicted
            return resident.ids[adapter_id], lambda: None
        source = source or "hub"
        if source not in SOURCES:
            raise ValidationFailed(f"adapter_source {source!r} is not supported here; use one of {', '.join(SOURCES)}")
        key = (source, adapter_id)
        with self.slots.key_lock(key):
            entry = self.slots.pin(key)
            if entry is None:
                folder = self._folder(adapter_id, source, api_token)
                self._check(adapter_id, folder)
                need = self._make_room(adapter_id, folder)
                name = self.slots.new_name()
                try:
                    self.host.load(folder, name, api_token)
                except Exception as e:
                    raise AdapterLoadFailed(
                        f"adapter {adapter_id} cannot be loaded into {self.model_id}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                    ) from None
                finally:
                    self.slots.load_ended(need)
                entry = self.slots.add(key, name)
                self._evict()
                self._refuse_if_alone_too_big(key, adapter_id)
        released = False

        def unpin() -> None:
            nonlocal released
            if not released:
                released = True
                self.slots.unpin(entry)

        return entry.name, unpin

    def _make_room(self, adapter_id: str, folder: Path) -> int:
        """Before a load: unload the victims the table names until this one fits both bounds beside what is loaded
        or loading (waiting while every loaded adapter is in use). Returns the bytes reserved."""
        need = lora_bytes(folder)
        if self.max_lora_bytes is not None and need > self.max_lora_bytes and not self.host.via_bundle(folder):
            raise AdapterLoadFailed(
                f"adapter {adapter_id} holds {need:,} bytes of LoRA weights, more than "
                f"--max-lora-memory {self.max_lora_bytes:,}; start the server with a larger bound"
            )
        while (victim := self.slots.reserve(need, self.host.lora_bytes)) is not None:
            self.host.unload(victim)
        return need

    def _evict(self) -> None:
        """Drop least-recently-used unpinned adapters while more than max_adapters are loaded or their LoRA
        weights take more than max_lora_bytes (measured again after each one: shared bases free only with
        their last user)."""
        while (victim := self.slots.over_victim(self.host.lora_bytes)) is not None:
            self.host.unload(victim)

    def _refuse_if_alone_too_big(self, key: Key, adapter_id: str) -> None:
        """An adapter whose own loaded LoRA weights exceed --max-lora-memory (its file's estimate said otherwise) is
        unloaded again and refused in one line. Its own layers are measured, not the total: under a burst the total
        also holds adapters that other requests are loading (a 1.8 MB adapter was once refused as 11 MB)."""
        if self.max_lora_bytes is None:
            return
        size = self.host.lora_size(self.slots.name_of(key))  # pinned: no eviction takes it meanwhile
        name = self.slots.drop_if(key, lambda: size <= self.max_lora_bytes)
        if name is None:
            return
        self.host.unload(name)
        raise AdapterLoadFailed(
            f"adapter {adapter_id} holds {size:,} bytes of LoRA weights, more than "
            f"--max-lora-memory {self.max_lora_bytes:,}; start the server with a larger bound"
        )

    # --- at start ----------------------------------------------------------------------------------
    def check_budget(self) -> None:
        """A --max-lora-memory below the smallest LoRA this base can take (rank 1 on its smallest weight matrix)
        can never hold an adapter: refused at start rather than at every first request."""
        if self.max_lora_bytes is None:
            return
        params = self.host.base.named_parameters()
        smallest = min(sum(p.shape) * 4 for n, p in params if p.ndim == 2)  # float32 once loaded
        if self.max_lora_bytes < smallest:
            raise ValidationFailed(
                f"--max-lora-memory {self.max_lora_bytes:,} bytes cannot hold any LoRA on {self.model_id} "
                f"(the smallest, rank 1 on one module, takes {smallest:,}); give a larger size, e.g. 64MB"
            )

    def preload_adapters(self, adapter_ids: list[str], *, token: str | None = None) -> None:
        """Load these now, as LoRAX's --preloaded-adapter-ids does (a folder under --adapter-dir, else a Hub repo);
        one that alone exceeds --max-lora-memory, or a set the bounds cannot hold together, is refused."""
        for adapter_id in adapter_ids:
            local = self.local_root is not None and (self.local_root / adapter_id / CONFIG_NAME).is_file()
            source = "local" if local else "hub"
            _, unpin = self.acquire(adapter_id, source, token)
            unpin()
            self.preloaded.append(f"{source}:{adapter_id}")
        evicted = [p for p in self.preloaded if p not in self.loaded_ids()]
        if evicted:
            raise ValidationFailed(
                f"the preloaded adapters do not fit together (--max-adapters {self.max_adapters}, "
                f"--max-lora-memory {self.max_lora_bytes or 'unbounded'}): {', '.join(evicted)} "
                "evicted again; preload fewer or raise the bound"
            )

    def preload_collection(self, source: str, *, token: str | None = None, log=lambda m: None) -> dict:
        """Make every member of a collection (folder or Hub repo) resident: its clusters' bases once, its cores
        stacked; the first member also loads through PEFT, which puts LoRA layers on the collection's modules."""
        from .resident import load_resident

        resident = in_own_thread(load_resident, source, token=token, log=log)
        folder = Path(resident.first) if resident.local else self._folder(resident.first, "hub", token)
        self._check(resident.first, folder)
        self.host.attach(resident, folder, token)
        self.resident_source, self._resident_token = source, token
        return resident.summary()

    def reload_collection(self) -> dict:
        """Read the resident collection again (its newest revision: members that joined since start become
        servable) and swap it in between two decoding steps. Anything wrong (a damaged file, a member or module
        gone) raises before the swap, so the server keeps serving the collection it had."""
        from .resident import PREFIX, load_resident

        old = self.host.resident
        if old is None:
            raise ValidationFailed("this server has no resident collection to reload (start it with --collection)")
        try:
            new = in_own_thread(load_resident, self.resident_source, token=self._resident_token)
        except Exception as e:
            raise ValidationFailed(
                f"collection {self.resident_source} not reloaded, still serving revision "
                f"{old.revision or 'as loaded'}: {str(e).splitlines()[0]}"
            ) from None
        gone = sorted(m.removeprefix(f"{PREFIX}{old.name}:") for m in set(old.slots) - set(new.slots))
        if gone or set(old.modules) != set(new.modules):
            change = f"drops members {', '.join(gone[:5])}" if gone else "adapts other modules"
            raise ValidationFailed(
                f"collection {self.resident_source} not reloaded: its new revision {change}; "
                "restart the server to serve it"
            )
        self.host.attach(new, Path(), None)  # layers already in place: only the cores are swapped
        return {**new.summary(), "members_before": old.members}

    def model_for(self, names: list[str]):
        """(model, each row's adapter name), or (base model, None) while no adapter is loaded."""
        return self.host.model_for(names)

    def loaded_ids(self) -> list[str]:
        """'source:id' of each adapter loaded through PEFT, least recently used first."""
        return self.slots.ids()

    def memory(self) -> dict:
        """Resident LoRA memory as of the last load or eviction (without the engine lock)."""
        return self.host.memory()
