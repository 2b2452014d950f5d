"""Adapters by name for the embedded backend: resolve (Hub or allowed local folder), check, load, LRU-evict.

Two bounds on what stays loaded, as servers budget: a number of adapters (--max-adapters) and bytes of resident
LoRA weights (--max-lora-memory). Adapters in use are never evicted, so a load that needs room while every loaded
adapter is in use waits for one to be released: the bounds hold under any burst. A preloaded collection
(resident.py) is outside both: all its members stay.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..peft_format.layout import BASE_MODEL_ID, CONFIG_NAME, SAFETENSORS_NAME
from .errors import AdapterLoadFailed, ValidationFailed
from .resolve import adapter_folder, check_adapter

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


def in_own_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a thread that ends with it. OpenMP keeps a thread team for every thread that ever ran a
    parallel torch op; loads run from request threads (or building a thousand members' stacks in the main thread)
    left idle teams beside the engine's, and decoding ran at 0.6x (measured, 1000 resident members)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="soppu-load") as pool:
        return pool.submit(fn, *args, **kwargs).result()


@dataclass
class Loaded:
    name: str  # PEFT adapter name (no dots allowed there)
    pins: int = 0


class AdapterStore:
    """Loaded adapters in LRU order with a soft cap: adapters in use are never evicted."""

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
        """`lock` guards the model: the engine holds it while generating, the store while (un)loading."""
        from .shared_bases import SharedBases

        self.base, self.peft, self.model_id, self.lock = base, None, model_id, lock
        self.shared = SharedBases() if share_bases else None
        self.max_adapters = max(1, max_adapters)
        self.max_lora_bytes = max_lora_bytes
        self.resident = None  # a ResidentCollection, when one was preloaded
        self.resident_source: str | None = None  # where it came from: a reload reads it again (with the same token)
        self._resident_token: str | None = None
        self.preloaded: list[str] = []  # "source:id" of the adapters loaded at start (LoRAX's preloaded_adapters)
        self.local_root = local_root.resolve() if local_root else None
        self.accepted_bases = {model_id, str(model_dir), model_dir.name, str(model_dir.resolve())}
        self.loaded: OrderedDict[tuple[str, str], Loaded] = OrderedDict()
        self._meta = threading.Lock()
        self._room = threading.Condition(self._meta)  # notified when an adapter is released or a load ends
        self._loading = (0, 0)  # (adapters, estimated bytes) being loaded now: room already taken
        self._key_locks: dict[tuple[str, str], threading.Lock] = {}
        self._counter = 0
        self._memory: dict = {"resident_lora_params": 0, "resident_lora_bytes": 0, "shared_bases": {}}

    def _folder(self, adapter_id: str, source: str, api_token: str | None) -> Path:
        return adapter_folder(
            adapter_id, source, local_root=self.local_root, api_token=api_token, with_bundle=self.shared is not None
        )

    def _check(self, adapter_id: str, folder: Path) -> None:
        check_adapter(adapter_id, folder, self.accepted_bases, self.model_id)

    # --- acquire / release -------------------------------------------------------------------------
    def acquire(self, adapter_id: str | None, source: str | None, api_token: str | None) -> tuple[str, callable]:
        """Load if needed and pin; returns (PEFT adapter name, unpin)."""
        if adapter_id is None or adapter_id in BASE_ALIASES:
            return BASE, lambda: None
        if self.resident is not None and adapter_id in self.resident.ids:  # always loaded, never evicted
            return self.resident.ids[adapter_id], lambda: None
        source = source or "hub"
        if source not in SOURCES:
            raise ValidationFailed(f"adapter_source {source!r} is not supported here; use one of {', '.join(SOURCES)}")
        key = (source, adapter_id)
        with self._meta:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            with self._meta:
                entry = self.loaded.get(key)
                if entry is not None:
                    entry.pins += 1
                    self.loaded.move_to_end(key)
            if entry is None:
                folder = self._folder(adapter_id, source, api_token)
                self._check(adapter_id, folder)
                need = self._make_room(adapter_id, folder)
                with self._meta:
                    self._counter += 1
                    name = f"adapter_{self._counter}"
                try:
                    in_own_thread(self._locked_load, folder, name, api_token)
                except Exception as e:
                    raise AdapterLoadFailed(
                        f"adapter {adapter_id} cannot be loaded into {self.model_id}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                    ) from None
                finally:
                    with self._meta:
                        self._loading = (self._loading[0] - 1, self._loading[1] - need)
                        self._room.notify_all()
                with self._meta:
                    entry = self.loaded[key] = Loaded(name, pins=1)
                self._evict()
                self._refuse_if_alone_too_big(key, adapter_id)
        released = False

        def unpin() -> None:
            nonlocal released
            if not released:
                released = True
                with self._meta:
                    entry.pins -= 1
                    if entry.pins == 0:
                        self._room.notify_all()

        return entry.name, unpin

    def _locked_load(self, folder: Path, name: str, token: str | None) -> None:
        with self.lock:
            self._load(folder, name, token)
            self._measure()

    def _load_peft(self, path: str, name: str):
        from .peft_patch import install

        if self.peft is None:
            from peft import PeftModel

            self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
        else:
            self.peft.load_adapter(path, adapter_name=name)
            if self.peft.active_adapter not in self.peft.peft_config:  # every earlier adapter was unloaded
                self.peft.set_adapter(name)
        install(self.peft)  # mixed batches in a few gathered matmuls, not PEFT's loop over adapters
        return self.peft

    def _load(self, folder: Path, name: str, token: str | None = None) -> None:
        """Through the bundle (shared basis) when the repo has one, else as the plain PEFT adapter."""
        if self._via_bundle(folder):
            self.shared.load(self._load_peft, folder, name, token=token or None)
        else:
            self._load_peft(str(folder), name)

    def _make_room(self, adapter_id: str, folder: Path) -> int:
        """Before a load: evict least-recently-used idle adapters until this one fits both bounds beside what is
        loaded or loading; while every loaded adapter is in use, wait for one to be released (as LoRAX queues a
        request until an adapter slot frees), so the bounds hold under any burst. Returns the bytes reserved."""
        need = lora_bytes(folder)
        if self.max_lora_bytes is not None and need > self.max_lora_bytes and not self._via_bundle(folder):
            raise AdapterLoadFailed(
                f"adapter {adapter_id} holds {need:,} bytes of LoRA weights, more than "
                f"--max-lora-memory {self.max_lora_bytes:,}; start the server with a larger bound"
            )
        while True:
            with self._meta:
                count, nbytes = self._loading
                full = len(self.loaded) + count + 1 > self.max_adapters or (
                    self.max_lora_bytes is not None
                    and self._memory["resident_lora_bytes"] + nbytes + need > self.max_lora_bytes
                )
                if not full or not (self.loaded or count):  # fits, or nothing else to make room from: load it
                    self._loading = (count + 1, nbytes + need)
                    return need
                victim = next((k for k, e in self.loaded.items() if e.pins == 0), None)
                if victim is None:
                    self._room.wait()
                    continue
                name = self.loaded.pop(victim).name
            self._unload(name)

    def _via_bundle(self, folder: Path) -> bool:
        from .shared_bases import has_bundle

        return self.shared is not None and has_bundle(folder)

    def _over(self) -> bool:
        too_many = len(self.loaded) > self.max_adapters
        return too_many or (
            self.max_lora_bytes is not None and self._memory["resident_lora_bytes"] > self.max_lora_bytes
        )

    def _evict(self) -> None:
        """Drop least-recently-used unpinned adapters while more than max_adapters are loaded or their LoRA
        weights take more than max_lora_bytes (measured again after each one: shared bases free only with
        their last user)."""
        while True:
            with self._meta:
                victim = next((k for k, e in self.loaded.items() if e.pins == 0), None) if self._over() else None
                if victim is None:
                    return
                name = self.loaded.pop(victim).name
            self._unload(name)

    def _unload(self, name: str) -> None:
        in_own_thread(self._locked_unload, name)

    def _locked_unload(self, name: str) -> None:
        from .peft_patch import adapters_changed

        with self.lock, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was active which is now deleted")  # PEFT picks another: fine
            self.peft.delete_adapter(name)
            adapters_changed()
            if self.shared is not None:
                self.shared.release(name)
            self._measure()

    def _refuse_if_alone_too_big(self, key: tuple[str, str], adapter_id: str) -> None:
        """An adapter whose own loaded LoRA weights exceed --max-lora-memory (its file's estimate said otherwise) is
        unloaded again and refused in one line. Its own layers are measured, not the total: under a burst the total
        also holds adapters that other requests are loading (a 1.8 MB adapter was once refused as 11 MB)."""
        from .shared_bases import resident_lora

        if self.max_lora_bytes is None:
            return
        with self._meta:
            own = self.loaded[key].name  # pinned: no eviction takes it meanwhile
        with self.lock:  # PEFT's layers change while another thread loads
            size = resident_lora(self.peft, adapter=own)[1]
        with self._meta:
            if size <= self.max_lora_bytes:
                return
            name = self.loaded.pop(key).name
        self._unload(name)
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
        smallest = min(sum(p.shape) * 4 for n, p in self.base.named_parameters() if p.ndim == 2)  # float32 once loaded
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
        from .resident import attach, load_resident

        resident = in_own_thread(load_resident, source, token=token, log=log)
        folder = Path(resident.first) if resident.local else self._folder(resident.first, "hub", token)
        self._check(resident.first, folder)

        def install() -> None:
            with self.lock:
                self._load(folder, "resident_layers", token)  # outside the LRU: never evicted
                attach(self.peft, resident)
                self.resident, self.resident_source, self._resident_token = resident, source, token
                self._measure()

        in_own_thread(install)
        return resident.summary()

    def reload_collection(self) -> dict:
        """Read the resident collection again (its newest revision: members that joined since start become
        servable) and swap it in between two decoding steps. Anything wrong (a damaged file, a member or module
        gone) raises before the swap, so the server keeps serving the collection it had."""
        from .resident import PREFIX, attach, load_resident

        if self.resident is None:
            raise ValidationFailed("this server has no resident collection to reload (start it with --collection)")
        old = self.resident
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

        def swap() -> None:
            with self.lock:
                attach(self.peft, new)
                self.resident = new
                self._measure()

        in_own_thread(swap)
        return {**new.summary(), "members_before": old.members}

    def model_for(self, names: list[str]):
        """(model, each row's adapter name), or (base model, None) while no adapter is loaded."""
        if self.peft is None or not self.peft.peft_config:  # none loaded (or all unloaded again): the base model
            return self.base, None
        return self.peft, names

    def loaded_ids(self) -> list[str]:
        """'source:id' of each adapter loaded through PEFT, least recently used first."""
        with self._meta:
            return [f"{s}:{a}" for s, a in self.loaded]

    def _measure(self) -> None:
        """Recount resident LoRA memory; called with the engine lock held, right after a load or an eviction."""
        from .shared_bases import resident_lora

        params, nbytes = resident_lora(self.peft)
        self._memory = {
            "resident_lora_params": params,
            "resident_lora_bytes": nbytes,
            "shared_bases": self.shared.summary() if self.shared is not None else {},
            "resident_collection": self.resident.summary() if self.resident is not None else None,
        }

    def memory(self) -> dict:
        """Resident LoRA parameters (shared tensors once) and the shared bases in use, as of the last load or
        eviction: /info must answer while a batch holds the model, so it does not take the engine lock."""
        return dict(self._memory)
