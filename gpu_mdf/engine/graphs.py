"""CUDA graphs for steady-state batches (opt-in: ``compile(..., cuda_graphs=True)``).

Per input signature (every fed input's shape and dtype) a program goes through three
states:

1. **first batch**: run eagerly (kernels compile, the memory pool grows to what a batch
   needs);
2. **second batch**: the batch's inputs are copied into buffers the graph owns, the
   program runs once under stream capture on a stream of its own
   (``cupy.cuda.Stream.begin_capture``/``end_capture``: nothing executes, every kernel is
   recorded), and the graph is launched;
3. **later batches**: inputs copied into those buffers, the graph replayed
   (``Graph.launch``), outputs copied out: three launches where the program takes one
   per step.

A replay writes the addresses the capture was given, so nobody else may get them: the
capture allocates from a memory pool of its own (``cupy.cuda.using_allocator``), kept
with the graph, and keeps every value of the captured run alive. A temporary an op frees
inside the capture stays in that private pool (reused by later kernels of the same graph,
in the same order on every replay), out of reach of the default pool and of its
``free_all_blocks`` (which the OOM split calls). A captured signature therefore costs the
sum of its intermediates, not their peak. Ordering with the caller's stream is by events,
never a host wait.

Where capture is impossible the program runs eagerly and says why
(:attr:`CudaGraphs.refused`): a plan that fetches a device value or uploads a host value
per batch (a capture cannot contain either), or an error from CUDA during capture (the
capture is ended and discarded). Numbers are the same as eager execution: the same
kernels on the same values; the tests compare them bit for bit on the strict stand-in,
which records a capture and replays it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Captured:
    graph: Any
    stream: Any
    inputs: dict          # input name -> the device buffer the graph reads
    outputs: dict         # output name -> the device buffer the graph writes
    env: dict             # every value of the captured run, kept alive with the graph
    pool: Any             # the memory pool the capture allocated from, the graph's alone
    consts: list          # the cached device constants the graph reads (ops.device_const)
    collected: Any = None  # the event after the last copy of the outputs (the next replay waits for it)


class _Retry(Exception):
    """A capture that failed for this batch only (its data, or memory): not a refusal."""


@dataclass
class CudaGraphs:
    """The captured graphs of one program, by input signature."""

    prog: Any
    seen: set = field(default_factory=set)
    graphs: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)     # signature -> why it runs eagerly
    replays: int = 0

    def __post_init__(self):
        plan = self.prog.plan
        why = ([f"it fetches a device value per batch ({plan.syncs[0]})"] if plan.syncs else []) + \
              ([f"it copies a host value to the device per batch ({plan.uploads[0]})"] if plan.uploads else [])
        self.never = "; ".join(why) or None

    @property
    def captures(self) -> int:
        return len(self.graphs)

    def describe(self) -> str:
        if self.never:
            return f"CUDA graphs: not used ({self.never})"
        text = f"CUDA graphs: {len(self.graphs)} captured, {self.replays} replays"
        if self.refused:
            text += f"; eager for {len(self.refused)} signature(s): {next(iter(self.refused.values()))}"
        return text

    def execute(self, feeds: dict) -> dict:
        prog = self.prog
        key = tuple(sorted((name, tuple(v.shape), v.dtype.str) for name, v in feeds.items()))
        g = self.graphs.get(key)
        if g is not None:
            return self._replay(g, feeds)
        if self.never or key in self.refused or key not in self.seen:
            self.seen.add(key)
            return prog.execute_eager(feeds)
        try:
            g = self._capture(feeds)
        except _Retry:                     # this batch's own error (or memory): eager, and it says so
            return prog.execute_eager(feeds)
        except Exception as e:             # CUDA refused the capture: this signature runs eagerly
            lines = str(e).splitlines() or [""]
            self.refused[key] = f"capture failed: {type(e).__name__}: {lines[0][:160]}"
            return prog.execute_eager(feeds)
        self.graphs[key] = g
        return self._collect(g, prog.xp.cuda.get_current_stream())

    def _capture(self, feeds: dict) -> _Captured:
        """Capture and launch once; the graph, or an exception with nothing left capturing
        and the caller's stream ordered after whatever was queued."""
        from ..errors import DataError
        from .ops import recording_device_consts
        from .run import is_oom
        prog = self.prog
        xp = prog.xp
        caller = xp.cuda.get_current_stream()
        stream = xp.cuda.Stream(non_blocking=True)
        pool = xp.cuda.MemoryPool()
        try:
            with stream, xp.cuda.using_allocator(pool.malloc), recording_device_consts() as consts:
                stream.wait_event(caller.record())
                inputs = {name: v.copy() for name, v in feeds.items()}
                stream.begin_capture()
                try:
                    env = prog.input_env(inputs)
                    out = prog._loop(env, None, release=False)
                finally:                   # Ctrl-C included: never leave the stream capturing
                    graph = _end(stream)
                if graph is None:
                    raise RuntimeError("the capture ended without a graph")
                graph.launch(stream)       # CUDA instantiates the graph here (newer CuPy): inside the try
                return _Captured(graph, stream, inputs, out, env, pool, consts)
        except (DataError, MemoryError) as e:
            raise _Retry() from e
        except Exception as e:
            if is_oom(e):
                raise _Retry() from e
            raise
        finally:
            caller.wait_event(stream.record())

    def _replay(self, g: _Captured, feeds: dict) -> dict:
        caller = self.prog.xp.cuda.get_current_stream()
        with g.stream:
            g.stream.wait_event(caller.record())
            if g.collected is not None:    # the last outputs' copies, whichever stream made them
                g.stream.wait_event(g.collected)
            for name, buf in g.inputs.items():
                buf[...] = feeds[name]
            g.graph.launch(g.stream)
        self.replays += 1
        return self._collect(g, caller)

    @staticmethod
    def _collect(g: _Captured, caller) -> dict:
        """The outputs, copied on the caller's stream once the graph is done: the copies
        belong to the caller's memory, and the feeds the graph read may be freed and reused
        by the caller's later work; the next replay waits for these copies."""
        caller.wait_event(g.stream.record())
        out = {k: v.copy() for k, v in g.outputs.items()}
        g.collected = caller.record()
        return out


def _end(stream):
    """End a capture that is in progress; its graph, or None when it was invalidated."""
    if not stream.is_capturing():
        return None
    try:
        return stream.end_capture()
    except Exception:                      # an invalidated capture ends with its own error
        return None
