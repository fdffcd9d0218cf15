"""A compiled MDF graph bound to an array module: :class:`Program`.

A run is a flat loop over the closures :func:`~gpu_mdf.engine.binder.bind` made; the
only device->host copy of a batch is its result. Feeding checks every input (layout,
dtype, NaN/Inf on the host) and normalises integer pixels on the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from ..errors import DataError
from .backend import Backend, blas_threads, cpu_threads
from .ops import OpError
from .plan import InputSpec, OutputSpec, Plan
from .preprocess import check_finite, fit_layout, normalize

_POOL = None


def _block_pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(cpu_threads(), thread_name_prefix="gpu-mdf-block")
    return _POOL


# --------------------------------------------------------------------------- #
# Program
# --------------------------------------------------------------------------- #
@dataclass
class Program:
    """A compiled MDF graph bound to a backend. See :func:`compile`."""

    model_id: str
    graph_id: str
    backend: Backend
    dtype: np.dtype
    inputs: list[InputSpec]
    outputs: list[OutputSpec]
    normalize: str
    plan: Plan = field(repr=False)
    _steps: list = field(repr=False, default_factory=list)        # (key, fn, release, what)
    _defaults: dict = field(repr=False, default_factory=dict)     # input name -> device array
    _out: list = field(repr=False, default_factory=list)          # (name, getter)
    bytes_per_item: int = 0
    tf32: bool = False                # float32 products with TensorFloat-32 inputs (compile(precision="tf32"))
    cuda_graphs: Any = None           # a graphs.CudaGraphs (compile(cuda_graphs=True)) on a GPU

    @property
    def xp(self):
        return self.backend.xp

    def describe(self) -> str:
        ins = ", ".join(p.describe() for p in self.inputs) or "none (a closed graph: evaluates once)"
        outs = ", ".join(p.describe() for p in self.outputs)
        text = (f"{self.model_id}/{self.graph_id}: {len(self._steps)} steps; inputs {ins}; "
                f"outputs {outs}; {self.dtype}; on {self.backend.describe()}")
        if self.plan.syncs:
            text += f"; device->host copies per batch: {len(self.plan.syncs)} ({self.plan.syncs[0]}...)"
        if self.plan.uploads:
            text += f"; host->device copies per batch: {len(self.plan.uploads)}"
        if self.tf32:
            text += "; matrix products in TF32 (approximate)"
        if self.cuda_graphs is not None:
            text += "; " + self.cuda_graphs.describe()
        if self.plan.notes:
            text += "; optimised: " + "; ".join(self.plan.notes)
        return text

    def step_names(self, inplace_only: bool = False) -> set[tuple[str, str]]:
        """(node, value) of the steps a batch runs (those done in place, with ``inplace_only``)."""
        return {st.key[:2] for st in self.plan.steps if isinstance(st.key, tuple) and len(st.key) == 3
                and (getattr(st, "inplace", False) or not inplace_only)}

    # -- feeding --------------------------------------------------------------- #
    def prepare(self, x, spec: InputSpec | None = None, check: bool = True):
        """Move one input batch to the device, normalising integer pixels there.

        Integer input to a float port (uint8 pixels) is cast and normalised on the
        device with the graph's normalisation; float input is taken as already
        normalised and, when it comes from the host, checked for NaN/Inf there (so a
        GPU never waits for the check); integer ports take integers as they are.
        """
        spec = spec or self.inputs[0]
        xp = self.xp
        on_host = isinstance(x, np.ndarray) or not self.backend.is_gpu
        if not hasattr(x, "dtype"):
            x = np.asarray(x)
            on_host = True
        fitted = fit_layout(x, spec.name, spec.shape)
        if fitted is not None:
            x = fitted                     # the model's layout first: normalisation depends on it
        want = np.dtype(spec.dtype)
        if spec.follows_feed and (x.dtype.kind == "f" or (x.dtype.kind in "iub" and self.normalize == "none")):
            want = np.dtype(x.dtype)
        if want.kind in "iub":
            if x.dtype.kind not in "iub":
                raise DataError(f"input {spec.name}: expects {want} values, got {x.dtype}")
            d = self.backend.to_device(x).astype(want, copy=False)
        elif np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
            d = normalize(self.backend.to_device(x), self.normalize, xp, want)
        elif np.issubdtype(x.dtype, np.floating):
            if check and on_host:
                check_finite(x, np, f"input {spec.name}")
                if want == np.float16 and x.dtype.itemsize > 2 and x.size:
                    top = float(np.abs(x).max())
                    if top > 65504:
                        raise DataError(f"input {spec.name}: values up to {top:.4g} exceed float16's range (65504) "
                                        f"under precision fp16")
            d = self.backend.to_device(x).astype(want, copy=False)
        else:
            raise DataError(f"input {spec.name}: unsupported dtype {x.dtype}")
        return d

    def check_input(self, x: np.ndarray, spec: InputSpec) -> np.ndarray:
        """A host batch for ``spec`` checked as :meth:`prepare` would, without moving it:
        in the input's layout, of a dtype it takes, free of NaN/Inf (a server checks each
        request this way before it joins a batch)."""
        fitted = fit_layout(x, spec.name, spec.shape)
        x = x if fitted is None else fitted
        if np.dtype(spec.dtype).kind in "iub" and x.dtype.kind not in "iub":
            raise DataError(f"input {spec.name!r} takes integers ({spec.dtype}), got {x.dtype}")
        if x.dtype.kind == "f":
            check_finite(x, np, f"input {spec.name!r}")
        return x

    def _feeds(self, batch, check: bool) -> dict[str, Any]:
        if batch is None:
            batch = {}
        if isinstance(batch, dict):
            unknown = [k for k in batch if k not in {p.name for p in self.inputs}]
            if unknown:
                raise DataError(f"unknown graph input(s) {unknown}; the graph takes "
                                f"{[p.name for p in self.inputs] or 'no input'}")
            missing = [p.name for p in self.inputs if p.name not in batch and p.name not in self._defaults]
            if missing:
                raise DataError(f"missing graph input(s) {missing}; the graph takes "
                                f"{[p.describe() for p in self.inputs]}")
            return {p.name: self.prepare(batch[p.name], p, check) for p in self.inputs if p.name in batch}
        if isinstance(batch, (list, tuple)) and len(self.inputs) > 1:
            if len(batch) != len(self.inputs):
                raise DataError(f"{len(batch)} arrays given for {len(self.inputs)} graph inputs")
            return {p.name: self.prepare(b, p, check) for p, b in zip(self.inputs, batch)}
        spec = self.primary_input
        if spec is None:
            raise DataError(f"the graph takes {len(self.inputs)} inputs "
                            f"{[p.name for p in self.inputs] or ''}: pass a dict keyed by input name"
                            + (" (or bind weights with constants=)" if len(self.inputs) > 1 else ""))
        return {spec.name: self.prepare(batch, spec, check)}

    @property
    def primary_input(self) -> InputSpec | None:
        """The input a single array feeds: the only input, or the only one without a default."""
        if len(self.inputs) == 1:
            return self.inputs[0]
        required = [p for p in self.inputs if p.default is None]
        return required[0] if len(required) == 1 else None

    # -- running --------------------------------------------------------------- #
    def execute(self, feeds: dict[str, Any], trace: list | None = None) -> dict[str, Any]:
        """Run on device arrays already prepared; returns device arrays by output name.

        ``trace``, when given, collects ``(key, value)`` of every step (the compile-time probe).
        """
        if self.cuda_graphs is not None and trace is None:
            return self.cuda_graphs.execute(feeds)
        return self.execute_eager(feeds, trace)

    def input_env(self, feeds: dict[str, Any]) -> dict:
        """The run's values before its first step: the inputs, fed or defaulted."""
        return {("input", p.name): feeds[p.name] if p.name in feeds else self._defaults[p.name] for p in self.inputs}

    def execute_eager(self, feeds: dict[str, Any], trace: list | None = None) -> dict[str, Any]:
        """:meth:`execute`, step by step (never a captured CUDA graph)."""
        env = self.input_env(feeds)
        if not self.backend.is_gpu:
            # overflow and NaN inside a model are not warnings here: a non-finite output is
            # an error of its item, reported by whoever reads the results (gpu-mdf infer)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                return self._loop(env, trace)
        return self._loop(env, trace)

    def _loop(self, env, trace, release: bool = True):
        if self.tf32:
            with self.backend.tf32():
                return self._steps_loop(env, trace, release)
        return self._steps_loop(env, trace, release)

    def _steps_loop(self, env, trace, release: bool):
        try:
            for key, fn, free, _what in self._steps:
                env[key] = fn(env)
                if trace is not None:
                    trace.append((key, env[key]))
                if release:
                    for k in free:
                        del env[k]
        except OpError as e:          # a value the kernel refuses, known only now (a shape fed per batch)
            raise DataError(f"{_what}: {e}") from None
        return {name: get(env) for name, get in self._out}

    def run(self, batch=None, to_host: bool = True, check: bool = True, threads: int | None = None):
        """Run one batch (a dict by input name, one array, or nothing for a closed graph).
        Returns the output array, or a dict when there are several.

        On the CPU, for a graph with large intermediate values per item (convolutions),
        a large batch fed as one array runs in blocks of about :attr:`block_size` items,
        so that each block's values stay in cache, spread over ``threads`` threads
        (default: every core), each with single-threaded BLAS (NumPy's elementwise work
        uses one core). Block boundaries depend on the batch size only, not on the
        thread count, so the numbers do not either; ``threads=1`` runs the blocks in turn.
        Graphs with small values per item (an MLP: the time is in a few large matrix
        products) run whole, with BLAS on every core.
        """
        if not self.backend.is_gpu and self.primary_input is not None and getattr(batch, "ndim", 0) \
                and self.block_size and len(batch) > self.block_size:
            return self._run_blocks(batch, threads or cpu_threads(), check)
        return self._run_whole(batch, to_host, check)

    def _run_whole(self, batch, to_host: bool = True, check: bool = True):
        with self.backend.use():
            out = self.execute(self._feeds(batch, check))
            if to_host:
                out = {k: self._host(v) for k, v in out.items()}
        return next(iter(out.values())) if len(out) == 1 else out

    @property
    def block_size(self) -> int:
        """Items per CPU block: a working set of about 32 MB (a last-level cache), or more
        where the graph has many small steps: at least about 2.5 MB of values per step that
        computes (a Transpose or Reshape is a view) per block, so that a step's fixed cost
        (10-40 microseconds of Python; a block of Keras MobileNetV2's 66 steps costs 1-1.5
        ms more than its work, and two threads' blocks take turns at the GIL for it) stays
        small against its work. 224x224 ImageNet models (20-90 MB per item) get blocks of 3
        to 6, which two threads take 1.3-2.5x faster than one block of 32 (2 to 5 measured
        alike); Keras MobileNetV2 at 96x96 (66 such steps, 15 MB) blocks of 11, two of 16 at
        batch 32 (four of 8 measured 1.3-1.4x slower on two threads, 1.2x on one). 0 where
        blocks do not pay (under 64 KB of values per item)."""
        if self.bytes_per_item < (64 << 10):
            return 0
        per_step = -(-self._computing_steps * (5 << 19) // self.bytes_per_item)
        return int(min(1024, max(1, (32 << 20) // self.bytes_per_item, per_step)))

    @cached_property
    def _computing_steps(self) -> int:
        """The steps that compute (not views: Transpose, Reshape...), counted once; a step
        that fuses several (an expansion, its depthwise conv, the projection and the
        residual Add) counts as those it runs: the blocks were measured with them apart,
        and counting it once made Keras MobileNetV2's blocks 9 where 11 (two of 16 at batch
        32) ran 1.35x faster on two threads than four of 8 (1.59-1.72x ONNX Runtime's time,
        where 1.20-1.26x, when the residual Add fused was not counted)."""
        return sum(getattr(st, "parts", 1) for st in self.plan.steps
                   if not getattr(getattr(st, "spec", None), "alias", False))

    def _run_blocks(self, batch, threads: int, check: bool):
        n = len(batch)
        # an even number of blocks (two cores are common; three blocks on two is a round
        # of one), from the batch size alone
        nb = min(n, max(1, 2 * round(n / self.block_size / 2)))
        bounds = [i * n // nb for i in range(nb + 1)]         # nb blocks whose sizes differ by one at most
        what = f"input {self.primary_input.name}"

        def block(k):
            lo = bounds[k]
            part = batch[lo:bounds[k + 1]]
            if check and part.dtype.kind == "f":
                check_finite(part, np, what, offset=lo)        # items numbered in the whole batch
            return self._run_whole(part, check=False)   # never blocked again (a block may be a little larger)
        starts = range(nb)
        if threads > 1:
            with blas_threads(1):
                outs = list(_block_pool().map(block, starts))
        else:
            outs = [block(lo) for lo in starts]
        if isinstance(outs[0], dict):
            return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        return np.concatenate(outs)

    def _host(self, v):
        if isinstance(v, np.ndarray):
            return v
        if self.backend.is_gpu and not np.isscalar(v):
            return self.backend.to_host(v)
        return np.asarray(v)

    def run_many(self, chunks: Iterable, check: bool = True) -> Iterator:
        """Run a stream of batches, yielding host results in order.

        On a GPU, copies of the next chunk (pinned host memory, its own stream)
        overlap the compute of the current one; see :mod:`gpu_mdf.engine.stream`.
        """
        if self.backend.is_gpu:
            from .stream import run_overlapped
            yield from run_overlapped(self, chunks, check)
            return
        for chunk in chunks:
            yield self.run(chunk, to_host=True, check=check)

    def suggest_batch_size(self, requested: int | None = None, memory_fraction: float = 0.5,
                           cpu_default: int = 2048) -> int:
        """A batch size that fits: on a GPU, a fraction of free memory over the
        measured bytes per item; on the CPU, a cache-friendly default."""
        free = self.backend.free_memory()
        if free is None or not self.bytes_per_item:
            return int(requested or cpu_default)
        fit = max(1, int(free * memory_fraction) // self.bytes_per_item)
        return int(min(requested, fit) if requested else min(fit, 1 << 20))
