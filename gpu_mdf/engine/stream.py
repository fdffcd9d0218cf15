"""GPU streaming: overlap host->device copies of the next chunk with compute of this one.

Chunks travel as compact host arrays (uint8 pixels: 784 bytes an image) through
two pinned staging buffers on a dedicated copy stream; the compute stream waits
on an event per chunk, so the copy of chunk i+1 runs while chunk i computes.
A chunk that does not fit in device memory is split in half and retried.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


def _is_oom(e: Exception) -> bool:
    return type(e).__name__ in ("OutOfMemoryError", "CUDARuntimeError") and "memory" in str(e).lower() \
        or type(e).__name__ == "OutOfMemoryError"


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
            view[...] = host
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
            compute_stream.wait_event(ev)
            try:
                with compute_stream:
                    feeds = {program.inputs[0].name: program.prepare(dev, check=check)}
                    out = program.execute(feeds)
                # stage the next chunk while this one computes
                pending = stage(nxt) if nxt is not None else None
                compute_stream.synchronize()
                result = {k: v.get() for k, v in out.items()}
            except Exception as e:
                if not _is_oom(e):
                    raise
                compute_stream.synchronize()
                host = dev.get()
                del dev, feeds
                cp.get_default_memory_pool().free_all_blocks()
                result = run_split_on_oom(program, host, check)
                result = result if isinstance(result, dict) else {program.outputs[0].name: result}
                pending = stage(nxt) if nxt is not None else None
            yield next(iter(result.values())) if len(result) == 1 else result
