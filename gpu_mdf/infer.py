"""Bulk inference: stream a dataset through a compiled MDF program in chunks.

Each finished chunk is written atomically to ``OUT/.chunks/NNNNNN.npz`` beside a
``job.json`` fingerprint (model bytes, input identity, batch size, normalisation...).
A rerun with the same arguments skips finished chunks; a changed model or input is
refused rather than mixed with old chunks (``overwrite`` replaces the other job's
files). The final files (``probabilities.npy``, ``predictions.csv``, ``metrics.json``,
``errors.csv``) are assembled by streaming the chunks, so memory stays bounded; the
chunks are then removed (``keep_chunks`` keeps them).
"""

from __future__ import annotations

import csv
import datetime
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .data import NORMALIZATIONS, Dataset, check_finite, normalize, open_dataset
from .distributed import cluster_session
from .engine import BatchResult, Program, compile, cpu_threads, load_constants, run_batch
from .errors import DataError, GpuMdfError, OutputError
from .io import atomic_path, file_sha256, write_json

CHUNK_DIR = ".chunks"
JOB_FILE = "job.json"
FINAL_FILES = ("probabilities.npy", "predictions.csv", "metrics.json", "errors.csv")


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


@dataclass(frozen=True)
class ChunkSpec:
    """What every chunk of a job shares (the single process and Dask workers alike)."""

    batch_size: int
    chunk_dir: str
    on_error: str
    float_normalize: str          # applied on the host to float pixel chunks ("none": as they are)


def model_image_size(prog: Program) -> tuple[int, int]:
    """The (height, width) a folder of images is brought to: the model's own 2-d input
    (with or without a size-1 channel axis), else MNIST's 28x28."""
    item = prog.primary_input.shape[1:] if prog.primary_input.shape else ()
    dims = [d for d in item if d != 1]
    if len(dims) == 2 and all(d > 0 for d in dims):
        return int(dims[0]), int(dims[1])
    return 28, 28


def run_inference(mdf_path: str | Path, out_dir: str | Path, source: str | None = None,
                  split: str = "test", labels: str | None = None, device: str = "auto",
                  batch_size: int | None = None, on_error: str = "fail", program: Program | None = None,
                  progress: bool = True, log=print, normalize: str | None = None,
                  cluster=None, constants: str | Path | None = None, invert: str = "auto", top_k: int = 0,
                  overwrite: bool = False, keep_chunks: bool = False) -> InferResult:
    """Run ``mdf_path`` over ``source`` and write the result files to ``out_dir``.

    ``program`` reuses an already compiled program (multi-item jobs). ``cluster``
    (``local[:N]``, ``cuda`` or a scheduler address) spreads the chunks over Dask
    workers, which write to the same chunk store; the files are the same.
    ``constants``: a ``.npz`` of values for unconnected input ports (weights that an
    exporter wrote as ports). ``normalize`` overrides the graph's pixel normalisation
    (applied to integer pixels on the device, to float pixels on the host; ``none``
    feeds the values as they are). ``invert``: polarity of image files (auto | yes | no).
    ``top_k`` adds the k best classes to predictions.csv.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: a file, not a folder; give --out a folder")
    mdf_path = Path(mdf_path).resolve()
    constants = None if constants is None else Path(constants).resolve()
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise DataError(f"unknown normalisation {normalize!r}; expected one of {NORMALIZATIONS}")
    with cluster_session(cluster, log) as session:   # connects before any file is written
        # with a cluster the workers run the model; here it only describes the graph
        prog = program or compile(mdf_path, device="cpu" if session else device, normalize=normalize,
                                  constants=None if constants is None else load_constants(constants))
        if prog.primary_input is None:
            raise GpuMdfError(f"{mdf_path.name}: bulk inference feeds one input, and this graph takes "
                              f"{[p.describe() for p in prog.inputs] or 'none'}"
                              + (" (bind the others with --constants)" if len(prog.inputs) > 1 else ""))
        size = model_image_size(prog)
        ds = open_dataset(source, split=split, labels=labels, image_size=size, invert=invert)
        if len(ds) == 0:
            raise DataError(f"{ds.name}: no images")
        nclass = _n_classes(prog)
        if top_k and nclass and top_k > nclass:
            raise DataError(f"--top-k {top_k}: the model has {nclass} classes")
        bs = prog.suggest_batch_size(batch_size)
        norm = normalize or prog.normalize
        identity = ds.source.identity()
        job = {"gpu_mdf": __version__, "model_sha256": file_sha256(mdf_path), "model": str(mdf_path),
               "data": identity.fingerprint(ds), "split": split, "batch_size": bs,
               "normalize": norm, "dtype": str(prog.dtype), "on_error": on_error, "top_k": top_k}
        if ds.inverted is not None:
            job["invert"], job["image_size"] = invert, list(size)
        if constants is not None:
            job["constants_sha256"] = file_sha256(constants)
        done_before = _finished(out, job)
        if done_before is not None:
            log(f"{out}: this job is complete already (its files are kept; --overwrite runs it again)")
            return done_before
        chunk_dir = _claim(out, job, overwrite)
        spec = ChunkSpec(bs, str(chunk_dir), on_error, norm)
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
                         source=identity.location, split=split, invert=invert, image_size=list(size),
                         labels=None if labels is None else str(Path(labels).resolve()), spec=spec),
                    todo, bar.update)
            else:
                run_chunks_here(prog, ds, todo, spec, bar.update)
        except KeyboardInterrupt:
            bar.close()
            finished = len(list(chunk_dir.glob("*.npz")))
            raise GpuMdfError(f"interrupted: {finished} of {nchunks} chunks are saved in {chunk_dir}; "
                              f"rerun the same command to resume") from None
        seconds = time.perf_counter() - t0
        bar.close()
        n_computed = sum(min(bs, len(ds) - i * bs) for i in todo)
        res = _assemble(prog, ds, out, chunk_dir, nchunks, job, seconds, n_computed, resumed, cluster_info,
                        identity.describe(ds))
        if not keep_chunks:
            shutil.rmtree(chunk_dir, ignore_errors=True)
        return res


def _n_classes(prog: Program) -> int | None:
    shape = prog.outputs[0].shape
    return int(shape[-1]) if shape and len(shape) == 2 and shape[-1] > 0 else None


# --------------------------------------------------------------------------- #
# Chunks
# --------------------------------------------------------------------------- #
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
        queue = iter(todo)
        try:
            for i in queue:
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
    from collections import deque

    fed: deque = deque()

    def feed():
        for i in todo:
            lo, hi = _bounds(i, spec, ds)
            try:
                x = _pixels(ds.read(lo, hi), spec, lo)
            except DataError as e:
                if spec.on_error != "skip":
                    raise
                probs, errors = _run_chunk(prog, ds, lo, hi, None, e, spec)
                on_done(_save_chunk(spec, i, ds, lo, probs, errors))
                continue
            fed.append((i, lo, hi))
            yield x

    for out in prog.run_many(feed(), check=False):
        i, lo, hi = fed.popleft()
        probs, errors = _finite_rows(BatchResult.of(prog, out), lo, ds, spec.on_error)
        on_done(_save_chunk(spec, i, ds, lo, probs, errors))


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
    probs, errors = _run_chunk(prog, ds, lo, hi, x, err, spec)
    return _save_chunk(spec, i, ds, lo, probs, errors)


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


def _save_chunk(spec: ChunkSpec, i: int, ds: Dataset, lo: int, probs, errors) -> int:
    inv = np.array([bool(ds.inverted.get(j, False)) for j in range(lo, lo + len(probs))]) \
        if ds.inverted is not None else np.zeros(0, bool)
    with atomic_path(Path(spec.chunk_dir) / f"{i:06d}.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, probs=probs, errors=np.array([json.dumps(e) for e in errors], dtype=str), inverted=inv)
    return len(probs)


def _run_chunk(prog: Program, ds: Dataset, lo: int, hi: int, x, read_error, spec: ChunkSpec):
    """Outputs for items [lo, hi); with on_error=skip, bad items become NaN rows."""
    if read_error is None:
        try:
            return _finite_rows(_run(prog, x), lo, ds, spec.on_error)
        except DataError:
            if spec.on_error != "skip":
                raise
    errors, good, idx = [], [], []
    for i in range(lo, hi):
        try:
            xi = _pixels(ds.read(i, i + 1), spec, i)
            prog.prepare(xi)  # validates shape and finiteness
            good.append(xi)
            idx.append(i - lo)
        except DataError as e:
            errors.append({"index": i, "item": ds.item_name(i), "error": str(e)})
    shape = prog.outputs[0].shape
    item = tuple(shape[1:]) if shape else (10,)
    probs = np.full((hi - lo,) + item, np.nan, np.float32)
    if good:
        p, more = _finite_rows(_run(prog, np.concatenate(good)), lo, ds, spec.on_error, [lo + j for j in idx])
        probs[idx] = p
        errors = sorted(errors + more, key=lambda e: e["index"])
    return probs, errors


def _finite_rows(result: BatchResult, lo: int, ds: Dataset, on_error: str, indices=None):
    """Non-finite model outputs (an overflow inside the model) are per-item errors, like NaN input."""
    probs = result.first
    if result.nonfinite is None:
        return probs, []
    bad = result.nonfinite
    where = indices or list(range(lo, lo + len(probs)))
    errors = [{"index": where[j], "item": ds.item_name(where[j]), "error": BatchResult.NONFINITE_REASON}
              for j in result.bad_items()]
    if on_error != "skip":
        raise DataError(f"{errors[0]['item']}: {errors[0]['error']}")
    probs = probs.astype(np.float32, copy=True)
    probs[bad] = np.nan
    return probs, errors


def _run(prog: Program, x) -> BatchResult:
    """One chunk; chunks already run in parallel on the CPU, one per core."""
    return run_batch(prog, x, threads=1)


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="img", unit_scale=True, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


# --------------------------------------------------------------------------- #
# The output folder
# --------------------------------------------------------------------------- #
def _claim(out: Path, job: dict, overwrite: bool = False) -> Path:
    """Make ``out`` ours: new, or holding this very job (resume). Another job's files
    are refused, or replaced with ``overwrite``; stale temporary files of an
    interrupted write are removed."""
    out.mkdir(parents=True, exist_ok=True)
    chunk_dir = out / CHUNK_DIR
    job_path = out / JOB_FILE
    ours = [p for p in out.iterdir() if p.name in FINAL_FILES or p.name in (CHUNK_DIR, JOB_FILE)]
    if job_path.exists():
        try:
            old = json.loads(job_path.read_text())
        except ValueError:
            old = None
        if old != job:
            if not overwrite:
                changed = sorted(k for k in set(old or {}) | set(job) if (old or {}).get(k) != job.get(k)) \
                    if isinstance(old, dict) else ["an unreadable job.json"]
                raise OutputError(f"{out} holds another job's files (different {', '.join(changed)}); "
                                  f"use another --out, or --overwrite to replace them")
            _remove(ours)
            write_json(job_path, job)
    else:
        if ours and not overwrite:
            raise OutputError(f"{out} holds files of an unknown job ({', '.join(sorted(p.name for p in ours))}); "
                              f"use another --out, or --overwrite to replace them")
        _remove(ours)
        write_json(job_path, job)
    chunk_dir.mkdir(exist_ok=True)
    for folder in (out, chunk_dir):     # a killed atomic write leaves .NAME.XXXX.tmp behind
        for stale in folder.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    return chunk_dir


def _remove(paths):
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def _finished(out: Path, job: dict) -> InferResult | None:
    """The result of this very job when it has completed in ``out`` already."""
    try:
        if json.loads((out / JOB_FILE).read_text()) != job or (out / CHUNK_DIR).exists():
            return None
        m = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not all((out / f).exists() for f in ("probabilities.npy", "predictions.csv")):
        return None
    files = {k: out / f for k, f in (("probabilities", "probabilities.npy"), ("predictions", "predictions.csv"),
                                     ("metrics", "metrics.json"), ("errors", "errors.csv")) if (out / f).exists()}
    return InferResult(out, m["images"], m.get("accuracy"), m["images_per_s"], m["device"], m["chunks"],
                       m["skipped"], files, m)


# --------------------------------------------------------------------------- #
# Final files
# --------------------------------------------------------------------------- #
def _assemble(prog, ds, out, chunk_dir, nchunks, job, seconds, n_computed, resumed, cluster_info, data_name):
    n = len(ds)
    bs, top_k = job["batch_size"], job["top_k"]
    labels = ds.labels
    first = np.load(chunk_dir / f"{0:06d}.npz")["probs"]
    classify = first.ndim == 2
    nclass = first.shape[1] if classify else 0
    cm = np.zeros((nclass, nclass), np.int64)
    errors, inverted = [], 0
    header = ["index", "source"]
    if classify:
        header += ["predicted", "probability"] + (["true"] if labels is not None else [])
        header += [h for k in range(1, top_k + 1) for h in (f"top{k}", f"top{k}_probability")]
    with atomic_path(out / "probabilities.npy") as tmp_p, atomic_path(out / "predictions.csv") as tmp_c:
        probs_out = np.lib.format.open_memmap(tmp_p, mode="w+", dtype=np.float32, shape=(n,) + first.shape[1:])
        with open(tmp_c, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for i in range(nchunks):
                z = np.load(chunk_dir / f"{i:06d}.npz")
                p = z["probs"]
                errors += [json.loads(e) for e in z["errors"]]
                inverted += int(z["inverted"].sum()) if "inverted" in z.files else 0
                lo = i * bs
                probs_out[lo:lo + len(p)] = p
                sources = [ds.item_name(j) for j in range(lo, lo + len(p))]
                if not classify:
                    w.writerows((lo + j, s) for j, s in enumerate(sources))
                    continue
                valid = ~np.isnan(p).any(axis=1)
                safe = np.nan_to_num(p, nan=-1)
                pred = np.where(valid, np.argmax(safe, axis=1), -1)
                conf = np.where(valid, np.nan_to_num(p, nan=0).max(axis=1), np.nan)
                top = np.argsort(-safe, axis=1, kind="stable")[:, :top_k] if top_k else None
                y = labels[lo:lo + len(p)] if labels is not None else None
                for j in range(len(p)):
                    row = [lo + j, sources[j], int(pred[j]), f"{conf[j]:.6f}"]
                    if y is not None:
                        row.append(int(y[j]))
                    if top is not None:
                        row += [v for c in top[j] for v in ((int(c), f"{p[j, c]:.6f}") if valid[j] else (-1, "nan"))]
                    w.writerow(row)
                if y is not None:
                    ok = valid & (y >= 0) & (y < nclass)
                    np.add.at(cm, (y[ok], pred[ok]), 1)
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
    metrics = _metrics(prog, ds, cm if classify else None, labels, n, len(errors), seconds, n_computed, job,
                       nchunks, resumed, data_name)
    if "invert" in job:
        metrics["invert"] = {"mode": job["invert"], "images_inverted": inverted, "image_size": job["image_size"]}
    if cluster_info:
        metrics["device"] = cluster_info["kind"]
        metrics["device_reason"] = "Dask workers (see cluster)"
        metrics["cluster"] = cluster_info
    files["metrics"] = write_json(out / "metrics.json", metrics)
    return InferResult(out, n, metrics.get("accuracy"), metrics["images_per_s"], metrics["device"],
                       resumed, len(errors), files, metrics)


def _metrics(prog, ds, cm, labels, n, skipped, seconds, n_computed, job, nchunks, resumed, data_name) -> dict:
    where = "on the device" if np.dtype(ds.dtype).kind in "iub" else "on the host (float pixels)"
    m = {"timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
         "images": n, "skipped": skipped, "source": ds.name,
         "data": data_name, "model": job["model"], "model_sha256": job["model_sha256"],
         "batch_size": job["batch_size"], "chunks": nchunks, "chunks_resumed": resumed,
         "images_per_s": (n_computed / seconds) if seconds and n_computed else 0.0,
         "seconds": seconds, "device": prog.backend.device, "backend": prog.backend.name,
         "device_reason": prog.backend.reason,
         "normalize": {"mode": job["normalize"], "applied": "no" if job["normalize"] == "none" else where},
         "host": {"cpu": _cpu_model(), "threads": cpu_threads(), "platform": platform.platform()},
         "versions": _versions(prog)}
    if labels is not None and cm is not None:
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


def _versions(prog) -> dict:
    from importlib import metadata
    v = {"gpu_mdf": __version__, "numpy": np.__version__, "python": platform.python_version()}
    for dist in ("modeci-mdf",):
        try:
            v[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            v[dist.replace("-", "_")] = None
    v["cupy"] = prog.backend.xp.__version__ if prog.backend.is_gpu else None
    return v


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
