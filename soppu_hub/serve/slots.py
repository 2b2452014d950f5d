"""Which adapters are loaded, pinned and evictable: the LRU bookkeeping behind AdapterStore, with no model in sight.

One lock guards the table; a condition wakes loads waiting for room when an adapter is released or a load ends;
a lock per adapter makes concurrent requests for the same adapter load it once. Nothing here touches PEFT: the
store asks for room, gets back victims to unload, and tells the table what happened.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

Key = tuple[str, str]  # (source, adapter id)


@dataclass
class Loaded:
    name: str  # PEFT adapter name (no dots allowed there)
    pins: int = 0


class Slots:
    """Loaded adapters in LRU order under two bounds (count, LoRA bytes); pinned ones are never evicted."""

    def __init__(self, max_adapters: int, max_lora_bytes: int | None) -> None:
        self.max_adapters = max(1, max_adapters)
        self.max_lora_bytes = max_lora_bytes
        self.loaded: OrderedDict[Key, Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified when an adapter is released or a load ends
        self._loading = (0, 0)  # (adapters, estimated bytes) being loaded now: room already taken
        self._key_locks: dict[Key, threading.Lock] = {}
        self._counter = 0

    def key_lock(self, key: Key) -> threading.Lock:
        """Held while one adapter is looked up and loaded: a second request for it waits and finds it loaded."""
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def pin(self, key: Key) -> Loaded | None:
        """The loaded entry, pinned and made most recent; None when it is not loaded."""
        with self._lock:
            entry = self.loaded.get(key)
            if entry is not None:
                entry.pins += 1
                self.loaded.move_to_end(key)
            return entry

    def reserve(self, need: int, resident_bytes: Callable[[], int]) -> str | None:
        """One step of making room for a load of `need` bytes: None when it fits beside what is loaded or loading
        (the room is then taken), else the PEFT name of a least-recently-used idle adapter, already out of the
        table, for the caller to unload before asking again. While every loaded adapter is in use, waits for one to
        be released (as LoRAX queues a request until an adapter slot frees), so the bounds hold under any burst."""
        with self._lock:
            while True:
                count, nbytes = self._loading
                full = len(self.loaded) + count + 1 > self.max_adapters or (
                    self.max_lora_bytes is not None and resident_bytes() + nbytes + need > self.max_lora_bytes
                )
                if not full or not (self.loaded or count):  # fits, or nothing else to make room from: load it
                    self._loading = (count + 1, nbytes + need)
                    return None
                victim = next((k for k, e in self.loaded.items() if e.pins == 0), None)
                if victim is not None:
                    return self.loaded.pop(victim).name
                self._room.wait()

    def new_name(self) -> str:
        """A PEFT adapter name never used before in this server."""
        with self._lock:
            self._counter += 1
            return f"adapter_{self._counter}"

    def load_ended(self, need: int) -> None:
        """A reserved load finished (or failed): its room is no longer taken."""
        with self._lock:
            self._loading = (self._loading[0] - 1, self._loading[1] - need)
            self._room.notify_all()

    def add(self, key: Key, name: str) -> Loaded:
        """A loaded adapter enters the table pinned once (by the request that loaded it)."""
        with self._lock:
            entry = self.loaded[key] = Loaded(name, pins=1)
            return entry

    def unpin(self, entry: Loaded) -> None:
        with self._lock:
            entry.pins -= 1
            if entry.pins == 0:
                self._room.notify_all()

    def over_victim(self, resident_bytes: Callable[[], int]) -> str | None:
        """While over a bound: the least-recently-used idle adapter's name, out of the table; else None."""
        with self._lock:
            over = len(self.loaded) > self.max_adapters or (
                self.max_lora_bytes is not None and resident_bytes() > self.max_lora_bytes
            )
            victim = next((k for k, e in self.loaded.items() if e.pins == 0), None) if over else None
            return None if victim is None else self.loaded.pop(victim).name

    def name_of(self, key: Key) -> str:
        with self._lock:
            return self.loaded[key].name

    def drop_if(self, key: Key, keep: Callable[[], bool]) -> str | None:
        """Take `key` out of the table unless `keep()` says otherwise (asked under the table's lock); its name."""
        with self._lock:
            return None if keep() else self.loaded.pop(key).name

    def ids(self) -> list[str]:
        """'source:id' of each loaded adapter, least recently used first."""
        with self._lock:
            return [f"{s}:{a}" for s, a in self.loaded]
