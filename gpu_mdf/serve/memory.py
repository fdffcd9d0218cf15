"""The server's own host-memory retention.

The ``gpu-mdf`` command keeps up to 1 GB of freed memory in glibc's heap for batch
inference (:mod:`gpu_mdf.engine.alloc`). A server's load comes in bursts, so ``gpu-mdf
serve`` states its own: blocks of 1 MiB or more (request bodies, large batches) are
mapped on their own and returned to the system when freed, at most ``retain`` bytes of
freed heap are kept (``M_TRIM_THRESHOLD``), and when the last large request of a burst
ends the heap is trimmed (``malloc_trim``). RSS goes back to its idle size plus at most
the retention.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


class Retention:
    def __init__(self, retain: int, mmap_from: int = 1 << 20):
        self.retain = retain
        self._libc = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                if libc.mallopt(_M_MMAP_THRESHOLD, mmap_from) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, retain) == 1:
                    self._libc = libc
            except (OSError, AttributeError):    # musl or another libc: leave it alone
                pass

    @property
    def active(self) -> bool:
        return self._libc is not None

    def trim(self) -> None:
        """Give freed heap memory back to the system, keeping ``retain`` bytes."""
        if self._libc is not None:
            self._libc.malloc_trim(ctypes.c_size_t(self.retain))


def rss() -> int | None:
    """This process's resident set size in bytes (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None
