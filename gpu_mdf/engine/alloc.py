"""Host allocator tuning for the NumPy backend.

A batch allocates a few large temporaries (the float input, layer outputs: 5 to 31
MB for 10k MNIST images). glibc serves blocks that large with ``mmap`` and returns
them with ``munmap``, so every batch pays page faults for fresh memory: 20-25% of
the reference model's time on the CPU. Keeping such blocks in the heap (mmap
threshold at glibc's 32 MB maximum, no trimming below 1 GB) removes that.

It changes the whole process (freed memory stays with it, up to 1 GB), so it is
opt-in for library users; the ``gpu-mdf`` command and Dask workers apply it.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_applied = False


def tune_host_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Keep large NumPy temporaries in the glibc heap. Returns True when applied
    (glibc on Linux), False elsewhere; safe to call more than once."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and \
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    except (OSError, AttributeError):  # musl or another libc: leave it alone
        return False
    _applied = ok
    return ok
