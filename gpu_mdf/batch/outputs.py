"""The final files of a job, assembled by streaming its chunks (memory stays bounded):
``probabilities.npy``, ``predictions.csv``, ``errors.csv`` and ``metrics.json``."""

from __future__ import annotations

import csv
import datetime
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..engine import Program, cpu_threads
from ..io import atomic_path, write_json
from .chunks import read_chunk
from .jobdir import InferResult, Job


@dataclass(frozen=True)
class RunRecord:
    """How this run computed its chunks (what metrics.json says beside the predictions)."""

    seconds: float
    computed: int                 # items computed by this run (resumed chunks not counted)
    resumed: int                  # chunks found finished when it started
    cluster: dict | None = None   # the Dask session's report, when it ran on one


@dataclass
class _Tally:
    """What reading the chunks gathers besides the outputs."""

    confusion: np.ndarray | None = None      # (true, predicted) counts, for a classifier with labels
    errors: list[dict] = field(default_factory=list)
    inverted: int = 0


def assemble(prog: Program, job: Job, record: RunRecord) -> InferResult:
    """Write the final files from the chunk store; returns the job's result."""
    out = job.out
    tally = _write_predictions(job)
    files = {"probabilities": out / "probabilities.npy", "predictions": out / "predictions.csv"}
    if tally.errors or job.fingerprint["on_error"] == "skip":
        files["errors"] = _write_errors(out / "errors.csv", tally.errors)
    metrics = _metrics(prog, job, record, tally)
    files["metrics"] = write_json(out / "metrics.json", metrics)
    return InferResult.of(out, metrics, files, record.resumed)


def _write_predictions(job: Job) -> _Tally:
    """probabilities.npy (every output row, NaN for a skipped item) and predictions.csv
    (for a classifier: the class, its probability, the true label, the top k)."""
    ds, top_k = job.data, job.fingerprint["top_k"]
    first = read_chunk(job.chunk_dir, 0)[0]
    classify = first.ndim == 2
    tally = _Tally(np.zeros((first.shape[1],) * 2, np.int64) if classify and ds.labels is not None else None)
    with atomic_path(job.out / "probabilities.npy") as tmp_p, atomic_path(job.out / "predictions.csv") as tmp_c:
        probs_out = np.lib.format.open_memmap(tmp_p, mode="w+", dtype=np.float32,
                                              shape=(len(ds),) + first.shape[1:])
        with open(tmp_c, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(_header(classify, ds.labels is not None, top_k))
            for i in range(job.n_chunks):
                probs, errors, inverted = read_chunk(job.chunk_dir, i)
                tally.errors += errors
                tally.inverted += inverted
                lo = i * job.batch_size
                probs_out[lo:lo + len(probs)] = probs
                sources = [ds.item_name(j) for j in range(lo, lo + len(probs))]
                if classify:
                    writer.writerows(_classified_rows(lo, sources, probs, ds.labels, top_k, tally.confusion))
                else:
                    writer.writerows((lo + j, s) for j, s in enumerate(sources))
        probs_out.flush()
        del probs_out
    return tally


def _header(classify: bool, has_labels: bool, top_k: int) -> list[str]:
    header = ["index", "source"]
    if classify:
        header += ["predicted", "probability"] + (["true"] if has_labels else [])
        header += [h for k in range(1, top_k + 1) for h in (f"top{k}", f"top{k}_probability")]
    return header


def _classified_rows(lo: int, sources: list[str], probs: np.ndarray, labels: np.ndarray | None, top_k: int,
                     confusion: np.ndarray | None) -> list[list]:
    """predictions.csv rows of one chunk of class probabilities (a skipped item, NaN:
    class -1); the confusion matrix counts the chunk's labelled items."""
    valid = ~np.isnan(probs).any(axis=1)
    safe = np.nan_to_num(probs, nan=-1)
    predicted = np.where(valid, np.argmax(safe, axis=1), -1)
    confidence = np.where(valid, np.nan_to_num(probs, nan=0).max(axis=1), np.nan)
    top = np.argsort(-safe, axis=1, kind="stable")[:, :top_k] if top_k else None
    truth = labels[lo:lo + len(probs)] if labels is not None else None
    rows = []
    for j in range(len(probs)):
        row = [lo + j, sources[j], int(predicted[j]), f"{confidence[j]:.6f}"]
        if truth is not None:
            row.append(int(truth[j]))
        if top is not None:
            row += [v for c in top[j] for v in ((int(c), f"{probs[j, c]:.6f}") if valid[j] else (-1, "nan"))]
        rows.append(row)
    if truth is not None:
        counted = valid & (truth >= 0) & (truth < len(confusion))
        np.add.at(confusion, (truth[counted], predicted[counted]), 1)
    return rows


def _write_errors(path: Path, errors: list[dict]) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["index", "item", "error"])
            writer.writeheader()
            writer.writerows(errors)
    return path


def _metrics(prog: Program, job: Job, record: RunRecord, tally: _Tally) -> dict:
    ds, fp, n = job.data, job.fingerprint, len(job.data)
    where = "on the device" if np.dtype(ds.dtype).kind in "iub" else "on the host (float pixels)"
    m = {"timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
         "images": n, "skipped": len(tally.errors), "source": ds.name,
         "data": job.identity.describe(ds), "model": fp["model"], "model_sha256": fp["model_sha256"],
         "batch_size": fp["batch_size"], "chunks": job.n_chunks, "chunks_resumed": record.resumed,
         "images_per_s": (record.computed / record.seconds) if record.seconds and record.computed else 0.0,
         "seconds": record.seconds, "device": prog.backend.device, "backend": prog.backend.name,
         "device_reason": prog.backend.reason,
         "normalize": {"mode": fp["normalize"], "applied": "no" if fp["normalize"] == "none" else where},
         "host": {"cpu": _cpu_model(), "threads": cpu_threads(), "platform": platform.platform()},
         "versions": _versions(prog)}
    if tally.confusion is not None:
        m.update(_accuracy(tally.confusion))
    if "invert" in fp:
        m["invert"] = {"mode": fp["invert"], "images_inverted": tally.inverted, "image_size": fp["image_size"]}
    if record.cluster:
        m["device"] = record.cluster["kind"]
        m["device_reason"] = "Dask workers (see cluster)"
        m["cluster"] = record.cluster
    return m


def _accuracy(confusion: np.ndarray) -> dict:
    """Accuracy, the confusion matrix, and precision and recall per class."""
    total = int(confusion.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.diag(confusion) / confusion.sum(axis=0)
        recall = np.diag(confusion) / confusion.sum(axis=1)
    return {"accuracy": float(np.trace(confusion) / total) if total else None,
            "confusion_matrix": confusion.tolist(),
            "per_class": {str(k): {"precision": None if np.isnan(precision[k]) else float(precision[k]),
                                   "recall": None if np.isnan(recall[k]) else float(recall[k]),
                                   "support": int(confusion[k].sum())} for k in range(len(confusion))}}


def _versions(prog: Program) -> dict:
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
