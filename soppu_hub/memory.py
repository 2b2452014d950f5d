"""Freed memory handed back to the operating system between the passes that read a thousand adapters."""

from __future__ import annotations


def trim_heap() -> None:
    """glibc's malloc_trim (nothing elsewhere). Reading a module position across a thousand adapters allocates and
    frees megabyte-sized tensors by the thousand; glibc keeps the freed chunks, so the 1000-adapter scale run's
    resident memory climbed to 5-7 GB (run to run: fragmentation) while its live data stayed near 1 GB."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
