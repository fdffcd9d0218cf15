"""GPU streaming: copies in, compute and copies out of consecutive chunks overlap.

Three CUDA streams and two pinned buffers each way:

* **copy in**: a chunk travels as compact host data (uint8 pixels: 784 bytes an image),
  is copied into pinned memory on the host (several threads) and sent to the device
  on the copy stream, which records an event;
* **compute**: the compute stream waits for that event, normalises on the device and
  runs the program, then records an event;
* **copy out**: the result stream waits for the compute event and copies the outputs
  into pinned host buffers asynchronously.

The host thread only blocks to hand over a chunk's result, and by then it has already
queued the next chunk's compute and the copy of the one after: the single
device->host synchronisation of a chunk waits for work that overlapped other work.
Float chunks are checked for NaN/Inf on the host before they are sent. A chunk that
does not fit in device memory is split in half and retried.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .backend import cpu_threads
from .preprocess import check_finite
from .run import is_oom, run_split_on_oom

_COPY_THREADS = max(1, min(8, cpu_threads()))   # ~8 memcpy threads keep up with PCIe 5
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


class _Pinned:
    """Two pinned host buffers used in turn, grown on demand."""

    def __init__(self, cupyx):
        self.cupyx = cupyx
        self.bufs: list = [None, None]

    def view(self, slot: int, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        size = int(np.prod(shape)) * dtype.itemsize
        buf = self.bufs[slot]
        if buf is None or buf.nbytes < size:
            buf = self.bufs[slot] = self.cupyx.empty_pinned((max(size, 1),), np.uint8)
        return buf[:size].view(dtype).reshape(shape)


def run_overlapped(program, chunks: Iterable, check: bool = True) -> Iterator:
    """Yield host results for each chunk, pipelining copies and compute on a GPU."""
    if len(program.inputs) != 1:  # several inputs: the plain path
        for c in chunks:
            yield run_split_on_oom(program, c, check)
        return
    with program.backend.use():
        yield from _Pipeline(program, check).run(chunks)


class _Pipeline:
    """The three streams of one overlapped run and the pinned buffers they share."""

    def __init__(self, program, check: bool):
        import cupy
        import cupyx
        self.cp, self.cupyx, self.program, self.check = cupy, cupyx, program, check
        self.spec = program.inputs[0]
        self.copy_stream = cupy.cuda.Stream(non_blocking=True)
        self.compute_stream = cupy.cuda.Stream(non_blocking=True)
        self.out_stream = cupy.cuda.Stream(non_blocking=True)
        self.pin_in, self.pin_out = _Pinned(cupyx), {}
        self.staged_count = 0

    def stage(self, host):
        """Host chunk -> pinned -> device, on the copy stream; returns (device array, event, host)."""
        host = np.ascontiguousarray(host)
        if self.check and host.dtype.kind == "f":
            check_finite(host, np, f"input {self.spec.name}")      # on the host: no device round trip
        view = self.pin_in.view(self.staged_count % 2, host.shape, host.dtype)
        parallel_copy(view, host)
        with self.copy_stream:
            dev = self.cp.empty(host.shape, host.dtype)
            dev.set(view, stream=self.copy_stream)
            ready = self.copy_stream.record()
        self.staged_count += 1
        return dev, ready, host

    def launch(self, dev, ready, slot):
        """Compute one staged chunk and queue the copy of its results to pinned memory."""
        program = self.program
        self.compute_stream.wait_event(ready)
        with self.compute_stream:
            outs = program.execute({self.spec.name: program.prepare(dev, self.spec, check=False)})
            computed = self.compute_stream.record()
        self.out_stream.wait_event(computed)
        hosts = {}
        with self.out_stream:
            for name, v in outs.items():
                if isinstance(v, np.ndarray):            # a host-side output (shape arithmetic)
                    hosts[name] = v
                    continue
                buf = self.pin_out.setdefault(name, _Pinned(self.cupyx)).view(slot, v.shape, v.dtype)
                hosts[name] = v.get(stream=self.out_stream, out=buf, blocking=False)
            copied = self.out_stream.record()
        return copied, hosts, outs      # device outputs stay referenced until copied

    @staticmethod
    def finish(pending):
        copied, hosts, _outs = pending
        copied.synchronize()              # the one wait of a chunk: its result
        res = {k: np.array(v, copy=True) for k, v in hosts.items()}   # pinned buffers are reused
        return next(iter(res.values())) if len(res) == 1 else res

    def run(self, chunks: Iterable) -> Iterator:
        it = iter(chunks)
        first = next(it, None)
        if first is None:
            return
        staged = self.stage(first)
        pending = None
        slot = 0
        while staged is not None:
            dev, ready, host = staged
            try:
                launched = self.launch(dev, ready, slot)
            except Exception as e:
                if not is_oom(e):
                    raise
                launched = None
            nxt = next(it, None)
            staged = self.stage(nxt) if nxt is not None else None      # copy of i+1 while i computes
            if pending is not None:
                yield self.finish(pending)
                pending = None
            if launched is None:                                   # out of memory: split and retry
                self.compute_stream.synchronize()
                dev = None
                self.cp.get_default_memory_pool().free_all_blocks()
                yield run_split_on_oom(self.program, host, self.check)
            else:
                pending = launched
                slot ^= 1
        if pending is not None:
            yield self.finish(pending)
