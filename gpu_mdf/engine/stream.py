"""GPU streaming: overlap host->device copies of the next chunk with compute of this one.

Chunks travel as compact host arrays (uint8 pixels: 784 bytes an image) through
two pinned staging buffers on a dedicated copy stream; the compute stream waits
on an event per chunk, so the copy of chunk i+1 runs while chunk i computes.
A chunk that does not fit in device memory is split in half and retried.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_COPY_THREADS = max(1, min(8, os.cpu_count() or 1))   # ~8 memcpy threads keep up with PCIe 5
_copy_pool: ThreadPoolExecutor | None = None


def parallel_copy(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy a large host array (e.g. into pinned memory) with a few threads: one
    memcpy thread cannot keep up with a PCIe 5 link. NumPy releases the GIL here."""
    global _copy_pool
    n = len(src)
    if src.nbytes < (8 << 20) or n < _COPY_THREADS:
        np.copyto(dst, src)
        return
    if _copy_pool is None:
        _copy_pool = ThreadPoolExecutor(_COPY_THREADS, thread_name_prefix="gpu-mdf-copy")
    bounds = np.linspace(0, n, _COPY_THREADS + 1).astype(int)
    list(_copy_pool.map(lambda i: np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]]),
                        range(_COPY_THREADS)))


def _is_oom(e: Exception) -> bool:
    """CuPy's pool raises OutOfMemoryError; a raw CUDA allocation failure is a
    CUDARuntimeError naming cudaErrorMemoryAllocation."""
    name = type(e).__name__
    return name == "OutOfMemoryError" or (name == "CUDARuntimeError" and "MemoryAllocation" in str(e))


def run_split_on_oom(program, x, check: bool = True, min_items: int = 1):
    """Run one host batch; on device OOM split it in halves and retry (not fatal)."""
    try:
        return program.run(x, to_host=True, check=check)
    except Exception as e:
        if not _is_oom(e) or len(x) <= min_items:
            raise
        program.xp.get_default_memory_pool().free_all_blocks()
        half = len(x) // 2
        a = run_split_on_oom(program, x[:half], check, min_items)
        b = run_split_on_oom(program, x[half:], check, min_items)
        if isinstance(a, dict):
            return {k: np.concatenate([a[k], b[k]]) for k in a}
        return np.concatenate([a, b])


def run_overlapped(program, chunks: Iterable, check: bool = True) -> Iterator:
    """Yield host results for each chunk, pipelining copies and compute on a GPU."""
    import cupy as cp
    import cupyx

    backend = program.backend
    if len(program.inputs) != 1:  # multi-input graphs: plain path
        for c in chunks:
            yield run_split_on_oom(program, c, check)
        return
    with backend.use():
        copy_stream = cp.cuda.Stream(non_blocking=True)
        compute_stream = cp.cuda.Stream(non_blocking=True)
        pinned: list = [None, None]
        pending = None  # (device input, ready event) for the chunk in flight
        slot = 0

        def stage(host):
            nonlocal slot
            host = np.ascontiguousarray(host)
            buf = pinned[slot]
            if buf is None or buf.nbytes < host.nbytes or buf.dtype != host.dtype:
                buf = pinned[slot] = cupyx.empty_pinned(host.shape, host.dtype)
            view = buf.reshape(-1)[: host.size].reshape(host.shape)
            parallel_copy(view, host)
            with copy_stream:
                dev = cp.empty(host.shape, host.dtype)
                dev.set(view, stream=copy_stream)
                ev = copy_stream.record()
            slot ^= 1
            return dev, ev

        it = iter(chunks)
        first = next(it, None)
        if first is None:
            return
        pending = stage(first)
        while pending is not None:
            dev, ev = pending
            nxt = next(it, None)
            staged = None
            compute_stream.wait_event(ev)
            try:
                with compute_stream:
                    out = program.execute({program.inputs[0].name: program.prepare(dev, check=check)})
                # stage the next chunk while this one computes
                staged = stage(nxt) if nxt is not None else None
                compute_stream.synchronize()
                result = {k: v.get() for k, v in out.items()}
            except Exception as e:
                if not _is_oom(e):
                    raise
                out = None
                compute_stream.synchronize()
                host = dev.get()
                dev = None
                cp.get_default_memory_pool().free_all_blocks()
                result = run_split_on_oom(program, host, check)
                result = result if isinstance(result, dict) else {program.outputs[0].name: result}
                if staged is None and nxt is not None:
                    staged = stage(nxt)
            pending = staged
            yield next(iter(result.values())) if len(result) == 1 else result
