"""Dynamic batching: concurrent requests for one model version are gathered into one
device batch, run once, and the results split back per request.

One worker thread per model version owns its compiled program. A batch closes when it
holds ``max_batch_size`` items, or ``max_queue_delay`` after its first request arrived,
or when the next request could not join it (another dtype: uint8 pixels are normalised
on the device, float input is taken as it is). A request larger than ``max_batch_size``
runs alone (the engine blocks it on the CPU and splits it on a GPU out of memory). The
queue is bounded in requests and in bytes: over either, :class:`QueueFull` (HTTP 503).
With ``dynamic=False`` every request runs alone, in arrival order. The event loop awaits
a result with :meth:`Batcher.result`.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import Unavailable


class QueueFull(Unavailable):
    """The queue holds its most requests or bytes; retry later."""


class Closed(Unavailable):
    """The model version is unloading: its batcher takes no more requests."""


@dataclass
class Job:
    feeds: dict[str, np.ndarray]
    items: int
    nbytes: int
    key: tuple
    done: Callable       # done(result dict | None, error | None, stats dict)
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, run: Callable[[dict], dict], name: str, max_batch_size: int = 256,
                 max_queue_delay: float = 0.005, max_queue_size: int = 256, max_queue_bytes: int = 256 << 20,
                 dynamic: bool = True, on_batch: Callable | None = None):
        self.run, self.name = run, name
        self.max_batch_size, self.max_queue_delay = max_batch_size, max_queue_delay
        self.max_queue_size, self.max_queue_bytes = max_queue_size, max_queue_bytes
        self.dynamic, self.on_batch = dynamic, on_batch
        self._q: collections.deque[Job] = collections.deque()
        self._bytes = 0
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._q)

    def submit(self, feeds: dict[str, np.ndarray], done: Callable) -> None:
        items = len(next(iter(feeds.values())))
        nbytes = sum(a.nbytes for a in feeds.values())
        key = tuple((k, a.dtype.str, a.shape[1:]) for k, a in sorted(feeds.items()))
        with self._cv:
            if self._closing:
                raise Closed(f"model {self.name} is unloading")
            if len(self._q) >= self.max_queue_size or (self._q and self._bytes + nbytes > self.max_queue_bytes):
                raise QueueFull(f"model {self.name}: the queue is full ({len(self._q)} requests, "
                                f"{self._bytes / 2**20:.0f} MiB waiting); retry later")
            self._q.append(Job(feeds, items, nbytes, key, done))
            self._bytes += nbytes
            self._cv.notify()

    async def result(self, feeds: dict[str, np.ndarray]) -> tuple[dict | None, Exception | None, dict]:
        """Submit from the event loop and wait there for ``(outputs, error, stats)``."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def resolve(out, error, stats):        # on the event loop
            if not future.done():
                future.set_result((out, error, stats))

        self.submit(feeds, lambda out, error, stats: loop.call_soon_threadsafe(resolve, out, error, stats))
        return await future

    def close(self, wait: bool = True) -> None:
        """Finish what is queued, then stop the worker."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if wait:
            self._thread.join()

    # -- the worker -------------------------------------------------------------- #
    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._q:
                if self._closing:
                    return None
                self._cv.wait()
            first = self._q.popleft()
            batch, items = [first], first.items
            deadline = first.enqueued + self.max_queue_delay
            while self.dynamic and items < self.max_batch_size:
                if self._q:
                    nxt = self._q[0]
                    if nxt.key != first.key or items + nxt.items > self.max_batch_size:
                        break
                    batch.append(self._q.popleft())
                    items += nxt.items
                    continue
                left = deadline - time.perf_counter()
                if left <= 0 or self._closing:
                    break
                self._cv.wait(left)
            self._bytes -= sum(j.nbytes for j in batch)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            t0 = time.perf_counter()
            try:
                if len(batch) == 1:
                    feeds = batch[0].feeds
                else:
                    feeds = {k: np.concatenate([j.feeds[k] for j in batch]) for k in batch[0].feeds}
                out = self.run(feeds)
                error = None
            except Exception as e:     # handed to every request of the batch
                out, error = None, e
            t1 = time.perf_counter()
            items = sum(j.items for j in batch)
            if self.on_batch:
                self.on_batch(items, len(batch), t1 - t0)
            lo = 0
            for j in batch:
                stats = {"queue_s": t0 - j.enqueued, "compute_s": t1 - t0, "batch_items": items}
                part = None if out is None else {k: v[lo:lo + j.items] for k, v in out.items()}
                lo += j.items
                try:
                    j.done(part, error, stats)
                except Exception:      # a waiter that went away must not stop the worker
                    pass
