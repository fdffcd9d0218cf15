"""The one safe way to run a batch, for every caller (``gpu-mdf infer``, the server, Dask).

:func:`run_batch` feeds the batch with the program's checks (layout, dtype, NaN/Inf in
float input), runs it (in cache-sized blocks on the CPU; on a GPU a batch that runs out
of device memory is split in halves and retried), brings every output to the host and
says which items came out non-finite (an overflow inside the model, an input it cannot
take): what to do with those is the caller's choice (an error row, an HTTP 400).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .preprocess import nonfinite_items


@dataclass
class BatchResult:
    outputs: dict[str, np.ndarray]       # every output of the graph, on the host, by name
    nonfinite: np.ndarray | None = None  # bool per item: NaN or Inf in one of its outputs (None: all finite)

    NONFINITE_REASON = ("the model's output is not finite (NaN or Inf: an overflow inside the model, or an "
                        "input it cannot take, such as an out-of-range embedding id)")

    @classmethod
    def of(cls, program, out) -> BatchResult:
        """The result of ``program.run`` (one array or a dict by output name), checked."""
        if not isinstance(out, dict):
            out = {program.outputs[0].name: out}
        outputs = {k: np.asarray(v) for k, v in out.items()}
        return cls(outputs, nonfinite_items(outputs))

    @property
    def first(self) -> np.ndarray:
        return next(iter(self.outputs.values()))

    def bad_items(self) -> list[int]:
        return [] if self.nonfinite is None else np.flatnonzero(self.nonfinite).tolist()


def run_batch(program, batch, check: bool = True, threads: int | None = None) -> BatchResult:
    """Run one batch (one array, a dict by input name) through ``program``; see the module."""
    out = run_split_on_oom(program, batch, check) if program.backend.is_gpu else \
        program.run(batch, check=check, threads=threads)
    return BatchResult.of(program, out)


def is_oom(e: Exception) -> bool:
    """CuPy's pool raises OutOfMemoryError; a raw CUDA allocation failure is a
    CUDARuntimeError naming cudaErrorMemoryAllocation."""
    name = type(e).__name__
    return name == "OutOfMemoryError" or (name == "CUDARuntimeError" and "MemoryAllocation" in str(e))


def run_split_on_oom(program, x, check: bool = True, min_items: int = 1):
    """Run one host batch; on device OOM split it in halves and retry (not fatal)."""
    try:
        return program.run(x, to_host=True, check=check)
    except Exception as e:
        if not is_oom(e) or isinstance(x, dict) or len(x) <= min_items:
            raise
        program.xp.get_default_memory_pool().free_all_blocks()
        half = len(x) // 2
        a = run_split_on_oom(program, x[:half], check, min_items)
        b = run_split_on_oom(program, x[half:], check, min_items)
        if isinstance(a, dict):
            return {k: np.concatenate([a[k], b[k]]) for k in a}
        return np.concatenate([a, b])


runrun_split_on_oom = run_split_on_oom      # the streaming path's fallback (engine.stream), and its tests
