"""Progress callbacks (done, total) shown as tqdm bars, and log lines that do not cut into them."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class ProgressBar:
    """One phase's tqdm bar on a terminal, opened on the first update. Piped to a file, a line at each tenth of the
    way with an estimate of the time left, instead of redrawn bars (hundreds of lines). Plain tqdm, not
    huggingface_hub's: a run turns the library's own per-file bars off (hub_bars_off) and keeps these;
    HF_HUB_DISABLE_PROGRESS_BARS=1 hides both."""

    def __init__(self, desc: str, unit: str) -> None:
        self.desc, self.unit, self.bar = desc, unit, None
        self.done, self.quiet, self.said, self.started, self.first = 0, False, -1, 0.0, 0

    def __call__(self, done: int, total: int) -> None:
        import time

        if self.bar is None:
            import os

            from tqdm import tqdm

            self.started, self.first = time.perf_counter(), done
            self.quiet = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").upper() in ("1", "ON", "YES", "TRUE")
            # kept on screen when done: each phase shows it reached 100%; disable=None: none when not a terminal
            self.bar = tqdm(total=total, unit=self.unit, desc=self.desc, disable=True if self.quiet else None)
        self.bar.total = total
        self.done = done
        self.bar.update(done - self.bar.n)
        tenth = 10 * done // max(total, 1)
        if self.bar.disable and not self.quiet and tenth > self.said:
            self.said = tenth
            # the pace since the first update (which came after the first unit of work): no estimate from it alone
            left = (time.perf_counter() - self.started) * (total - done) / max(done - self.first, 1)
            eta = ""
            if self.first < done < total:
                eta = f", about {left / 60:.0f} min left" if left >= 90 else f", about {left:.0f} s left"
            print(
                f"{self.desc}: {done} of {total} {self.unit}s{' done' if done >= total else ''}{eta}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def hub_bars_off(group: str | None = None, *, when: bool = True) -> Iterator[None]:
    """huggingface_hub's own progress bars (all, or one `group` such as "huggingface_hub.http_get") off inside the
    block, and back as they were after it."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_off = are_progress_bars_disabled(group)
    if when:
        disable_progress_bars(group)
    try:
        yield
    finally:
        if when and not was_off:
            enable_progress_bars(group)


def hold_tqdm_lock() -> None:
    """Call before running huggingface_hub from several threads. Its thread_map (uploads, snapshot downloads)
    creates tqdm's class lock when missing and deletes it on the way out; from several threads at once that races
    (AttributeError: type object 'tqdm' has no attribute '_lock'). With the lock made here first, none deletes it."""
    from huggingface_hub.utils import tqdm as hf_tqdm
    from tqdm import tqdm as std_tqdm

    std_tqdm.get_lock()
    hf_tqdm.set_lock(std_tqdm.get_lock())


def log_above_bars(msg: str) -> None:
    """A log line printed over a live progress bar would be cut into it mid-word: tqdm.write moves the bar."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)
