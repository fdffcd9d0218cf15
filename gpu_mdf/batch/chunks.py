"""Chunks: the unit of work of a bulk run, in this process or on a Dask worker.

Chunk ``i`` holds items ``[i * batch_size, (i + 1) * batch_size)``; it is read, run
and saved atomically as ``CHUNK_DIR/NNNNNN.npz`` (every output of the graph, the
per-item errors and which images were inverted). :class:`ChunkTask` is what a Dask worker is sent:
how to compile the program and open the data itself, with absolute paths.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import Dataset, check_finite, normalize, open_dataset
from ..engine import BatchResult, Program, compile, cpu_threads, load_constants, run_batch
from ..errors import DataError
from ..io import atomic_path


@dataclass(frozen=True)
class ChunkSpec:
    """What every chunk of a job shares (the single process and Dask workers alike)."""

    batch_size: int
    chunk_dir: str
    on_error: str
    float_normalize: str          # applied on the host to float pixel chunks ("none": as they are)


@dataclass(frozen=True)
class ModelRef:
    """The program a worker compiles (once per worker process: the key of its cache)."""

    mdf_path: str                 # absolute
    model_sha256: str
    device: str
    normalize: str | None
    constants: str | None = None  # an absolute .npz path
    opset: int | None = None      # for a file that does not record its opset (--opset)
    precision: str | None = None  # --precision

    def compile(self) -> Program:
        consts = load_constants(self.constants) if self.constants else None
        return compile(self.mdf_path, device=self.device, normalize=self.normalize, constants=consts,
                       opset=self.opset, precision=self.precision)


@dataclass(frozen=True)
class DataRef:
    """The dataset a worker opens (once per worker process: the key of its cache)."""

    source: str                   # the source's identity location: the embedded name or an absolute path
    split: str
    labels: str | None            # absolute
    image_size: tuple[int, int]
    invert: str

    def open(self) -> Dataset:
        return open_dataset(self.source, split=self.split, labels=self.labels, image_size=self.image_size,
                            invert=self.invert)


@dataclass(frozen=True)
class ChunkTask:
    """Everything a Dask worker needs to run chunks of one job."""

    model: ModelRef
    data: DataRef
    spec: ChunkSpec


def chunk_file(chunk_dir: str | Path, i: int) -> Path:
    return Path(chunk_dir) / f"{i:06d}.npz"


@dataclass
class Chunk:
    """A saved chunk: every output of the graph (in the program's order, NaN rows for
    skipped items), the per-item errors and how many images were inverted."""

    outputs: list[np.ndarray]
    errors: list[dict]
    inverted: int


def read_chunk(chunk_dir: Path, i: int, outputs: bool = True) -> Chunk:
    """Chunk ``i``; ``outputs=False`` reads its errors and inversions only."""
    with np.load(chunk_file(chunk_dir, i)) as z:
        n = sum(1 for k in z.files if k.startswith("out"))
        arrays = [z[f"out{k}"] for k in range(n)] if outputs else []
        inverted = int(z["inverted"].sum()) if "inverted" in z.files else 0
        return Chunk(arrays, [json.loads(e) for e in z["errors"]], inverted)


def chunk_output(chunk_dir: Path, i: int, k: int) -> np.ndarray:
    """Output ``k`` of chunk ``i`` alone (an npz member is read on its own)."""
    with np.load(chunk_file(chunk_dir, i)) as z:
        return z[f"out{k}"]


def run_chunks_here(prog: Program, ds: Dataset, todo: list[int], spec: ChunkSpec, on_done,
                    threads: int | None = None) -> None:
    """Run chunks in this process: on the CPU, several chunks at once (one per core),
    each with single-threaded BLAS; on a GPU, through the overlapped stream."""
    if prog.backend.is_gpu:
        _run_chunks_streamed(prog, ds, todo, spec, on_done)
        return
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from threadpoolctl import threadpool_limits
    threads = threads or cpu_threads()
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        pending: set = set()
        try:
            for i in todo:
                pending.add(pool.submit(process_chunk, prog, ds, i, spec))
                if len(pending) >= 2 * threads:   # bounded: memory stays flat
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        on_done(f.result())
            for f in pending:
                on_done(f.result())
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def _run_chunks_streamed(prog: Program, ds: Dataset, todo: list[int], spec: ChunkSpec, on_done) -> None:
    """GPU: chunks flow through :func:`~gpu_mdf.engine.stream.run_overlapped` (the copy
    of chunks i+1 and i+2 while chunk i computes, results copied back asynchronously).
    A chunk that cannot go whole (an unreadable item, NaN or Inf pixels) takes the
    per-item path instead, which records each bad item."""
    fed: deque = deque()

    def feed():
        for i in todo:
            lo, hi = _bounds(i, spec, ds)
            try:
                x = _pixels(ds.read(lo, hi), spec, lo)
            except DataError as e:
                if spec.on_error != "skip":
                    raise
                outputs, errors = _run_chunk(prog, ds, lo, hi, None, e, spec)
                on_done(_save_chunk(spec, i, ds, lo, outputs, errors))
                continue
            fed.append((i, lo, hi))
            yield x

    for out in prog.run_many(feed(), check=False):
        i, lo, hi = fed.popleft()
        outputs, errors = _finite_rows(prog, BatchResult.of(prog, out), lo, ds, spec.on_error)
        on_done(_save_chunk(spec, i, ds, lo, outputs, errors))


def process_chunk(prog: Program, ds: Dataset, i: int, spec: ChunkSpec) -> int:
    """Read, run and save chunk ``i`` (atomically). Returns the number of items.

    The single-process job and every Dask worker call this same function with
    single-threaded BLAS: OpenBLAS's results depend on its thread count and on the
    rows per call, so fixed chunks computed this way give the same bytes wherever
    and on however many cores they run.
    """
    lo, hi = _bounds(i, spec, ds)
    try:
        x, err = _pixels(ds.read(lo, hi), spec, lo), None
    except DataError as e:
        if spec.on_error != "skip":
            raise
        x, err = None, e
    outputs, errors = _run_chunk(prog, ds, lo, hi, x, err, spec)
    return _save_chunk(spec, i, ds, lo, outputs, errors)


def _bounds(i: int, spec: ChunkSpec, ds: Dataset) -> tuple[int, int]:
    lo = i * spec.batch_size
    return lo, min(lo + spec.batch_size, len(ds))


def _pixels(x: np.ndarray, spec: ChunkSpec, lo: int) -> np.ndarray:
    """Float pixels are normalised here, on the host, as integer pixels are on the device
    (the graph's normalisation); NaN/Inf are refused naming the item."""
    if x.dtype.kind != "f":
        return x
    check_finite(x, np, "input", offset=lo)
    if spec.float_normalize == "none":
        return x
    if spec.float_normalize == "scale":
        hi = float(x.max()) if x.size else 0.0
        if 0.0 < hi <= 1.0:
            raise DataError("float pixels in [0, 1] look already scaled, and the model divides by 255: "
                            "give 0-255 values or pass --normalize none")
    return normalize(x.astype(np.float32, copy=False), spec.float_normalize)


def _save_chunk(spec: ChunkSpec, i: int, ds: Dataset, lo: int, outputs: list[np.ndarray], errors) -> int:
    n = len(outputs[0])
    inv = np.array([bool(ds.inverted.pop(j, False)) for j in range(lo, lo + n)]) \
        if ds.inverted is not None else np.zeros(0, bool)
    arrays = {f"out{k}": a for k, a in enumerate(outputs)}
    with atomic_path(chunk_file(spec.chunk_dir, i)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays, errors=np.array([json.dumps(e) for e in errors], dtype=str), inverted=inv)
    return n


def _run_chunk(prog: Program, ds: Dataset, lo: int, hi: int, x, read_error, spec: ChunkSpec):
    """Every output for items [lo, hi); with on_error=skip, bad items become NaN rows."""
    if read_error is None:
        try:
            return _finite_rows(prog, _run(prog, x), lo, ds, spec.on_error)
        except DataError:
            if spec.on_error != "skip":
                raise
    errors, good_items, good_rows = [], [], []
    for i in range(lo, hi):
        try:
            xi = _pixels(ds.read(i, i + 1), spec, i)
            prog.prepare(xi)  # validates shape and finiteness
            good_items.append(xi)
            good_rows.append(i - lo)
        except DataError as e:
            errors.append({"index": i, "item": ds.item_name(i), "error": str(e)})
    good, more_errors = _finite_rows(prog, _run(prog, np.concatenate(good_items)), lo, ds, spec.on_error,
                                     [lo + j for j in good_rows]) if good_items else (None, [])
    outputs = []
    for k, o in enumerate(prog.outputs):
        like = good[k] if good is not None else None
        item = like.shape[1:] if like is not None else _declared_item(o)
        rows = np.full((hi - lo,) + tuple(item), np.nan, _nan_dtype(like))
        if like is not None:
            rows[good_rows] = like
        outputs.append(rows)
    return outputs, sorted(errors + more_errors, key=lambda e: e["index"])


def _declared_item(o) -> tuple:
    """An output's declared item shape (a chunk with no good item has nothing else to go by)."""
    shape = tuple(o.shape[1:]) if o.shape else ()
    return shape if all(d > 0 for d in shape) else (1,)


def _nan_dtype(like) -> np.dtype:
    """Rows that may hold NaN: the output's float type, float64 for integer outputs."""
    return like.dtype if like is not None and like.dtype.kind == "f" else np.dtype(np.float64)


def _finite_rows(prog: Program, result: BatchResult, lo: int, ds: Dataset, on_error: str, indices=None):
    """Every output (in the program's order); non-finite model outputs (an overflow inside
    the model) are per-item errors, like NaN input, and their rows NaN in every output."""
    outputs = [result.outputs[o.name] for o in prog.outputs]
    if result.nonfinite is None:
        return outputs, []
    where = indices or list(range(lo, lo + len(outputs[0])))
    errors = [{"index": where[j], "item": ds.item_name(where[j]), "error": BatchResult.NONFINITE_REASON}
              for j in result.bad_items()]
    if on_error != "skip":
        raise DataError(f"{errors[0]['item']}: {errors[0]['error']}")
    marked = []
    for a in outputs:
        a = a.astype(_nan_dtype(a), copy=True)
        a[result.nonfinite] = np.nan
        marked.append(a)
    return marked, errors


def _run(prog: Program, x) -> BatchResult:
    """One chunk; chunks already run in parallel on the CPU, one per core."""
    return run_batch(prog, x, threads=1)
