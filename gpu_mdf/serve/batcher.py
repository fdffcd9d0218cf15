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

What a request costs the server is kept small: the worker is woken by the first request
of a batch (and by the one that fills it), not by every arrival; a finished batch hands
its results back to the event loop in one call, not one per request.
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


class LoopWaiter:
    """A request awaited on an event loop: resolved there with the others of its batch."""
    __slots__ = ("loop", "future")

    def __init__(self, loop, future):
        self.loop, self.future = loop, future


def _resolve(waiters: list) -> None:       # on the event loop, once per batch
    for future, result in waiters:
        if not future.done():
            future.set_result(result)


@dataclass
class Job:
    feeds: dict[str, np.ndarray]
    items: int
    nbytes: int
    key: tuple
    done: Callable | LoopWaiter     # done(result dict | None, error | None, stats dict)
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
        self._bytes = self._items = 0
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._q)

    def submit(self, feeds: dict[str, np.ndarray], done: Callable | LoopWaiter) -> None:
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
            self._items += items
            if len(self._q) == 1 or self._items >= self.max_batch_size or not self.dynamic:
                self._cv.notify()

    async def result(self, feeds: dict[str, np.ndarray]) -> tuple[dict | None, Exception | None, dict]:
        """Submit from the event loop and wait there for ``(outputs, error, stats)``."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.submit(feeds, LoopWaiter(loop, future))
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
            if self.dynamic:        # wait out the first request's delay, unless the batch fills first
                deadline = self._q[0].enqueued + self.max_queue_delay
                while self._items < self.max_batch_size and not self._closing:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            first = self._q.popleft()
            batch, items = [first], first.items
            while self.dynamic and self._q and items < self.max_batch_size:
                nxt = self._q[0]
                if nxt.key != first.key or items + nxt.items > self.max_batch_size:
                    break
                batch.append(self._q.popleft())
                items += nxt.items
            self._bytes -= sum(j.nbytes for j in batch)
            self._items -= items
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
            self._hand_back(batch, out, error, t0, t1, items)

    def _hand_back(self, batch: list[Job], out, error, t0: float, t1: float, items: int) -> None:
        """Each request its rows of the outputs: loop waiters in one call per event loop."""
        lo, waiters = 0, {}
        for j in batch:
            stats = {"queue_s": t0 - j.enqueued, "compute_s": t1 - t0, "batch_items": items}
            part = None if out is None else {k: v[lo:lo + j.items] for k, v in out.items()}
            lo += j.items
            if isinstance(j.done, LoopWaiter):
                waiters.setdefault(j.done.loop, []).append((j.done.future, (part, error, stats)))
                continue
            try:
                j.done(part, error, stats)
            except Exception:      # a waiter that went away must not stop the worker
                pass
        for loop, results in waiters.items():
            try:
                loop.call_soon_threadsafe(_resolve, results)
            except RuntimeError:   # the loop is closed: nobody waits any more
                pass
