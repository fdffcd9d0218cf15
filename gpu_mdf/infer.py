"""Bulk inference: stream a dataset through a compiled MDF program in chunks.

Each finished chunk is written atomically to ``OUT/.chunks/NNNNNN.npz`` beside a
``job.json`` fingerprint (model bytes, input identity, batch size, normalisation).
A rerun with the same arguments skips finished chunks; a changed model or input
is refused rather than mixed with old chunks. The final files
(``probabilities.npy``, ``predictions.csv``, ``metrics.json``, ``errors.csv``)
are assembled by streaming the chunks, so memory stays bounded.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .data import EMBEDDED_MNIST_SHA256, Dataset, check_finite, open_dataset
from .distributed import cluster_session
from .engine import Program, compile, load_constants
from .errors import DataError, GpuMdfError, OutputError
from .io import atomic_path, file_sha256, write_json

CHUNK_DIR = ".chunks"
JOB_FILE = "job.json"
FINAL_FILES = ("probabilities.npy", "predictions.csv", "metrics.json", "errors.csv")


def dataset_identity(source: str | None, ds: Dataset) -> dict:
    ident = {"name": ds.name, "length": len(ds), "shape": list(ds.image_shape), "dtype": str(ds.dtype)}
    if source in (None, "mnist", "mnist:test", "mnist:train"):
        ident["embedded_sha256"] = EMBEDDED_MNIST_SHA256
    else:
        p = Path(source)
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        ident["files"] = [[str(q.relative_to(p.parent)), q.stat().st_size, q.stat().st_mtime_ns]
                          for q in files[:10000]]
        ident["file_count"] = len(files)
    return ident


@dataclass
class InferResult:
    out_dir: Path
    n: int
    accuracy: float | None
    images_per_s: float
    device: str
    chunks_resumed: int
    skipped: int
    files: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


def run_inference(mdf_path: str | Path, out_dir: str | Path, source: str | None = None,
                  split: str = "test", labels: str | None = None, device: str = "auto",
                  batch_size: int | None = None, on_error: str = "fail", program: Program | None = None,
                  progress: bool = True, log=print, normalize: str | None = None,
                  cluster=None, constants: str | Path | None = None) -> InferResult:
    """Run ``mdf_path`` over ``source`` and write the result files to ``out_dir``.

    ``program`` reuses an already compiled program (multi-item jobs). ``cluster``
    (``local[:N]``, ``cuda`` or a scheduler address) spreads the chunks over Dask
    workers, which write to the same chunk store; the files are the same.
    ``constants``: a ``.npz`` of values for unconnected input ports (weights that an
    exporter wrote as ports), bound at compile time.
    """
    out = Path(out_dir).resolve()
    mdf_path = Path(mdf_path).resolve()
    constants = None if constants is None else Path(constants).resolve()
    with cluster_session(cluster, log) as session:   # connects before any file is written
        # with a cluster the workers run the model; here it only describes the graph
        prog = program or compile(mdf_path, device="cpu" if session else device, normalize=normalize,
                                  constants=None if constants is None else load_constants(constants))
        if prog.primary_input is None:
            raise GpuMdfError(f"{mdf_path.name}: bulk inference feeds one input, and this graph takes "
                              f"{[p.describe() for p in prog.inputs] or 'none'}"
                              + (" (bind the others with --constants)" if len(prog.inputs) > 1 else ""))
        ds = open_dataset(source, split=split, labels=labels)
        if len(ds) == 0:
            raise DataError(f"{ds.name}: no images")
        bs = prog.suggest_batch_size(batch_size)
        job = {"gpu_mdf": __version__, "model_sha256": file_sha256(mdf_path), "model": str(mdf_path),
               "data": dataset_identity(source, ds), "split": split, "batch_size": bs,
               "normalize": prog.normalize, "dtype": str(prog.dtype), "on_error": on_error}
        if constants is not None:
            job["constants_sha256"] = file_sha256(constants)
        chunk_dir = _claim(out, job)
        log(session.describe() if session else prog.backend.describe())
        log(f"{ds.describe()}; batch size {bs}")

        nchunks = -(-len(ds) // bs)
        done = {int(p.stem) for p in chunk_dir.glob("*.npz")}
        resumed = len(done & set(range(nchunks)))
        if resumed:
            log(f"resuming: {resumed} of {nchunks} chunks already done")
        todo = [i for i in range(nchunks) if i not in done]
        bar = _progress(len(ds), progress, initial=min(resumed * bs, len(ds)))
        t0 = time.perf_counter()
        cluster_info = None
        try:
            if session:
                cluster_info = session.run_chunks(
                    dict(mdf_path=str(mdf_path), model_sha256=job["model_sha256"], device=device,
                         normalize=prog.normalize, constants=None if constants is None else str(constants),
                         source=_abs_source(source), split=split,
                         labels=None if labels is None else str(Path(labels).resolve()), batch_size=bs,
                         chunk_dir=str(chunk_dir), on_error=on_error),
                    todo, bar.update)
            else:
                run_chunks_here(prog, ds, todo, bs, chunk_dir, on_error, bar.update)
        except KeyboardInterrupt:
            bar.close()
            finished = len(list(chunk_dir.glob("*.npz")))
            raise GpuMdfError(f"interrupted: {finished} of {nchunks} chunks are saved in {chunk_dir}; "
                              f"rerun the same command to resume") from None
        seconds = time.perf_counter() - t0
        bar.close()
        n_computed = sum(min(bs, len(ds) - i * bs) for i in todo)
        return _assemble(prog, ds, out, chunk_dir, nchunks, bs, job, seconds, n_computed, resumed,
                         cluster_info)


def _abs_source(source):
    if source is None or str(source).startswith("mnist"):
        return source
    return str(Path(source).resolve())


def run_chunks_here(prog: Program, ds: Dataset, todo: list[int], bs: int, chunk_dir: Path, on_error: str,
                    on_done, threads: int | None = None) -> None:
    """Run chunks in this process: on the CPU, several chunks at once (one per core),
    each with single-threaded BLAS; on a GPU, through the overlapped stream."""
    if prog.backend.is_gpu:
        _run_chunks_streamed(prog, ds, todo, bs, chunk_dir, on_error, on_done)
        return
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from threadpoolctl import threadpool_limits
    threads = threads or os.cpu_count() or 1
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        pending: set = set()
        queue = iter(todo)
        try:
            for i in queue:
                pending.add(pool.submit(process_chunk, prog, ds, i, bs, chunk_dir, on_error))
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


def _run_chunks_streamed(prog: Program, ds: Dataset, todo: list[int], bs: int, chunk_dir: Path, on_error: str,
                         on_done) -> None:
    """GPU: chunks flow through :func:`~gpu_mdf.engine.stream.run_overlapped` (the copy
    of chunk i+1 and i+2 while chunk i computes, results copied back asynchronously).
    A chunk that cannot go whole (an unreadable item, NaN or Inf pixels) takes the
    per-item path instead, which records each bad item."""
    from collections import deque

    fed: deque = deque()

    def feed():
        for i in todo:
            lo, hi = i * bs, min(i * bs + bs, len(ds))
            try:
                x = ds.read(lo, hi)
                if x.dtype.kind == "f":
                    check_finite(x, np, "input")
            except DataError as e:
                if on_error != "skip":
                    raise
                probs, errors = _run_chunk(prog, ds, lo, hi, None, e, on_error)
                on_done(_save_chunk(chunk_dir, i, probs, errors))
                continue
            fed.append((i, lo, hi))
            yield x

    for out in prog.run_many(feed(), check=False):
        i, lo, hi = fed.popleft()
        probs, errors = _finite_rows(_first_output(out), lo, ds, on_error)
        on_done(_save_chunk(chunk_dir, i, probs, errors))


def process_chunk(prog: Program, ds: Dataset, i: int, bs: int, chunk_dir: Path, on_error: str) -> int:
    """Read, run and save chunk ``i`` (atomically). Returns the number of images.

    The single-process job and every Dask worker call this same function with
    single-threaded BLAS: OpenBLAS's results depend on its thread count and on the
    rows per call, so fixed chunks computed this way give the same bytes wherever
    and on however many cores they run.
    """
    lo = i * bs
    hi = min(lo + bs, len(ds))
    try:
        x, err = ds.read(lo, hi), None
    except DataError as e:
        if on_error != "skip":
            raise
        x, err = None, e
    probs, errors = _run_chunk(prog, ds, lo, hi, x, err, on_error)
    return _save_chunk(chunk_dir, i, probs, errors)


def _save_chunk(chunk_dir: Path, i: int, probs, errors) -> int:
    with atomic_path(Path(chunk_dir) / f"{i:06d}.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, probs=probs, errors=np.array([json.dumps(e) for e in errors], dtype=str))
    return len(probs)


def _claim(out: Path, job: dict) -> Path:
    """Make ``out`` ours: new, or holding this very job (resume). Anything else is refused."""
    out.mkdir(parents=True, exist_ok=True)
    chunk_dir = out / CHUNK_DIR
    job_path = out / JOB_FILE
    if job_path.exists():
        try:
            old = json.loads(job_path.read_text())
        except ValueError:
            raise OutputError(f"{job_path}: unreadable job file; use another --out") from None
        if old != job:
            changed = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
            raise OutputError(f"{out} holds another job's files (different {', '.join(changed)}); "
                              f"use another --out or delete that folder")
    else:
        foreign = [p.name for p in out.iterdir() if p.name in FINAL_FILES or p.name == CHUNK_DIR]
        if foreign:
            raise OutputError(f"{out} holds files of an unknown job ({', '.join(sorted(foreign))}); "
                              f"use another --out or delete them")
        write_json(job_path, job)
    chunk_dir.mkdir(exist_ok=True)
    return chunk_dir


def _run_chunk(prog: Program, ds: Dataset, lo: int, hi: int, x, read_error, on_error):
    """Probabilities for images [lo, hi); with on_error=skip, bad items become NaN rows."""
    if read_error is None:
        try:
            return _finite_rows(_first_output(_run(prog, x)), lo, ds, on_error)
        except DataError:
            if on_error != "skip":
                raise
    errors, good, idx = [], [], []
    for i in range(lo, hi):
        try:
            xi = ds.read(i, i + 1)
            prog.prepare(xi)  # validates shape and finiteness
            good.append(xi)
            idx.append(i - lo)
        except DataError as e:
            errors.append({"index": i, "item": ds.item_name(i), "error": str(e)})
    nout = prog.outputs[0].shape[-1] if prog.outputs[0].shape else 10
    probs = np.full((hi - lo, nout), np.nan, np.float32)
    if good:
        p, more = _finite_rows(_first_output(_run(prog, np.concatenate(good))), lo, ds, on_error,
                               [lo + j for j in idx])
        probs[idx] = p
        errors = sorted(errors + more, key=lambda e: e["index"])
    return probs, errors


def _finite_rows(probs, lo: int, ds: Dataset, on_error: str, indices=None):
    """Non-finite model outputs (an overflow inside the model) are per-item errors, like NaN input."""
    probs = np.asarray(probs)
    flat = probs.reshape(len(probs), -1)
    bad = ~np.isfinite(flat).all(axis=1)
    if not bad.any():
        return probs, []
    where = indices or list(range(lo, lo + len(probs)))
    errors = [{"index": where[j], "item": ds.item_name(where[j]),
               "error": "the model's output is not finite (NaN or Inf: an overflow inside the model)"}
              for j in np.flatnonzero(bad)]
    if on_error != "skip":
        raise DataError(f"{errors[0]['item']}: {errors[0]['error']}")
    probs = probs.astype(np.float32, copy=True)
    probs[bad] = np.nan
    return probs, errors


def _run(prog: Program, x):
    """One chunk; on a GPU a chunk that runs out of memory is split and retried."""
    if prog.backend.is_gpu:
        from .engine.stream import run_split_on_oom
        return run_split_on_oom(prog, x)
    return prog.run(x, threads=1)        # chunks already run in parallel, one per core


def _first_output(out):
    return out if not isinstance(out, dict) else next(iter(out.values()))


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="img", unit_scale=True, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def _assemble(prog, ds, out, chunk_dir, nchunks, bs, job, seconds, n_computed, resumed, cluster_info):
    n = len(ds)
    labels = ds.labels
    first = np.load(chunk_dir / f"{0:06d}.npz")["probs"]
    nclass = first.shape[1]
    cm = np.zeros((nclass, nclass), np.int64)
    errors = []
    with atomic_path(out / "probabilities.npy") as tmp_p, atomic_path(out / "predictions.csv") as tmp_c:
        probs_out = np.lib.format.open_memmap(tmp_p, mode="w+", dtype=np.float32, shape=(n, nclass))
        with open(tmp_c, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "predicted", "probability"] + (["true"] if labels is not None else []))
            for i in range(nchunks):
                z = np.load(chunk_dir / f"{i:06d}.npz")
                p = z["probs"]
                errors += [json.loads(e) for e in z["errors"]]
                lo = i * bs
                probs_out[lo:lo + len(p)] = p
                valid = ~np.isnan(p).any(axis=1)
                pred = np.where(valid, np.argmax(np.nan_to_num(p, nan=-1), axis=1), -1)
                conf = np.where(valid, np.nan_to_num(p, nan=0).max(axis=1), np.nan)
                rows = zip(range(lo, lo + len(p)), pred.tolist(), conf.tolist())
                if labels is not None:
                    y = labels[lo:lo + len(p)]
                    w.writerows((r[0], r[1], f"{r[2]:.6f}", t) for r, t in zip(rows, y.tolist()))
                    ok = valid & (y >= 0) & (y < nclass)
                    np.add.at(cm, (y[ok], pred[ok]), 1)
                else:
                    w.writerows((r[0], r[1], f"{r[2]:.6f}") for r in rows)
        probs_out.flush()
        del probs_out
    files = {"probabilities": out / "probabilities.npy", "predictions": out / "predictions.csv"}
    if errors or job["on_error"] == "skip":
        with atomic_path(out / "errors.csv") as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["index", "item", "error"])
                w.writeheader()
                w.writerows(errors)
        files["errors"] = out / "errors.csv"
    metrics = _metrics(prog, ds, cm, labels, n, len(errors), seconds, n_computed, bs, nchunks, resumed)
    if cluster_info:
        metrics["device"] = cluster_info["kind"]
        metrics["device_reason"] = "Dask workers (see cluster)"
        metrics["cluster"] = cluster_info
    files["metrics"] = write_json(out / "metrics.json", metrics)
    return InferResult(out, n, metrics.get("accuracy"), metrics["images_per_s"], metrics["device"],
                       resumed, len(errors), files, metrics)


def _metrics(prog, ds, cm, labels, n, skipped, seconds, n_computed, bs, nchunks, resumed) -> dict:
    m = {"images": n, "skipped": skipped, "source": ds.name, "batch_size": bs, "chunks": nchunks,
         "chunks_resumed": resumed,
         "images_per_s": (n_computed / seconds) if seconds and n_computed else 0.0,
         "seconds": seconds, "device": prog.backend.device, "backend": prog.backend.name,
         "device_reason": prog.backend.reason, "normalize": prog.normalize,
         "versions": {"gpu_mdf": __version__, "numpy": np.__version__,
                      "python": platform.python_version()}}
    if prog.backend.is_gpu:
        m["versions"]["cupy"] = prog.backend.xp.__version__
    if labels is not None:
        total = int(cm.sum())
        m["accuracy"] = float(np.trace(cm) / total) if total else None
        m["confusion_matrix"] = cm.tolist()
        with np.errstate(invalid="ignore", divide="ignore"):
            prec = np.diag(cm) / cm.sum(axis=0)
            rec = np.diag(cm) / cm.sum(axis=1)
        m["per_class"] = {str(k): {"precision": None if np.isnan(prec[k]) else float(prec[k]),
                                   "recall": None if np.isnan(rec[k]) else float(rec[k]),
                                   "support": int(cm[k].sum())} for k in range(len(cm))}
    return m
