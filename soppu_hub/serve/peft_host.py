"""The model adapters are loaded into: PEFT loads and unloads under the engine's lock, the resident collection's
layers, and the LoRA memory they take, measured after every change.

Every change runs in a thread of its own (in_own_thread) and holds the engine's lock, which the engine holds while
it generates: a load lands between two decoding steps. `memory()` answers from the last measurement without the
lock, so /info answers while a batch runs.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path


def in_own_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a thread that ends with it. OpenMP keeps a thread team for every thread that ever ran a
    parallel torch op; loads run from request threads (or building a thousand members' stacks in the main thread)
    left idle teams beside the engine's, and decoding ran at 0.6x (measured, 1000 resident members)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="soppu-load") as pool:
        return pool.submit(fn, *args, **kwargs).result()


class PeftHost:
    """The base model, the PeftModel once an adapter is loaded, the shared bases and the resident collection."""

    def __init__(self, base, lock: threading.RLock, *, share_bases: bool = True) -> None:
        """`lock` guards the model: the engine holds it while generating, the host while (un)loading."""
        from .shared_bases import SharedBases

        self.base, self.peft, self.lock = base, None, lock
        self.shared = SharedBases() if share_bases else None
        self.resident = None  # a ResidentCollection, once attached
        self._memory: dict = {"resident_lora_params": 0, "resident_lora_bytes": 0, "shared_bases": {}}

    def via_bundle(self, folder: Path) -> bool:
        """Whether this folder loads through its shared-basis bundle (a repo with `soppu/`, bases shared)."""
        from .shared_bases import has_bundle

        return self.shared is not None and has_bundle(folder)

    def load(self, folder: Path, name: str, token: str | None = None) -> None:
        """Load under the lock, in a thread of its own, and measure again."""

        def locked() -> None:
            with self.lock:
                self._load(folder, name, token)
                self._measure()

        in_own_thread(locked)

    def unload(self, name: str) -> None:
        from .peft_patch import adapters_changed

        def locked() -> None:
            with self.lock, warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*was active which is now deleted")  # PEFT picks another
                self.peft.delete_adapter(name)
                adapters_changed()
                if self.shared is not None:
                    self.shared.release(name)
                self._measure()

        in_own_thread(locked)

    def lora_size(self, name: str) -> int:
        """Bytes of one loaded adapter's own LoRA layers (under the lock: PEFT's layers change while others load)."""
        from .shared_bases import resident_lora

        with self.lock:
            return resident_lora(self.peft, adapter=name)[1]

    def attach(self, resident, folder: Path, token: str | None) -> None:
        """Make a resident collection servable: its first member loads through PEFT (LoRA layers on the
        collection's modules, outside the LRU: never evicted), then every member's cores go onto those layers."""
        from .resident import attach

        def install() -> None:
            with self.lock:
                if self.resident is None:
                    self._load(folder, "resident_layers", token)
                attach(self.peft, resident)
                self.resident = resident
                self._measure()

        in_own_thread(install)

    def model_for(self, names: list[str]):
        """(model, each row's adapter name), or (base model, None) while no adapter is loaded."""
        if self.peft is None or not self.peft.peft_config:  # none loaded (or all unloaded again): the base model
            return self.base, None
        return self.peft, names

    def lora_bytes(self) -> int:
        """Resident LoRA bytes as of the last change."""
        return self._memory["resident_lora_bytes"]

    def memory(self) -> dict:
        """Resident LoRA parameters (shared tensors once) and the shared bases in use, as of the last load or
        eviction: /info must answer while a batch holds the model, so it does not take the engine lock."""
        return dict(self._memory)

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
        if self.via_bundle(folder):
            self.shared.load(self._load_peft, folder, name, token=token or None)
        else:
            self._load_peft(str(folder), name)

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
