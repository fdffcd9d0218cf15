"""The job folder: ``job.json`` (the job's fingerprint), the chunk store, the final files.

A folder belongs to one job. A rerun with the same fingerprint resumes (or finds the
job complete already); another job's files are refused, or replaced with
``overwrite``, never mixed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..data import Dataset, Identity
from ..errors import OutputError
from ..io import write_json

CHUNK_DIR = ".chunks"
JOB_FILE = "job.json"
_RESULT_FILES = {"probabilities": "probabilities.npy", "predictions": "predictions.csv",
                 "metrics": "metrics.json", "errors": "errors.csv"}      # InferResult.files key -> name
FINAL_FILES = tuple(_RESULT_FILES.values())


@dataclass
class InferResult:
    """A job's outcome: counts and speed from its metrics, and its final files by kind."""

    out_dir: Path
    n: int
    accuracy: float | None
    images_per_s: float
    device: str
    chunks_resumed: int
    skipped: int
    files: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @classmethod
    def of(cls, out_dir: Path, metrics: dict, files: dict, chunks_resumed: int) -> InferResult:
        """The result a job's metrics.json and final files describe."""
        return cls(out_dir, metrics["images"], metrics.get("accuracy"), metrics["images_per_s"], metrics["device"],
                   chunks_resumed, metrics["skipped"], files, metrics)


@dataclass(frozen=True)
class Job:
    """One bulk run as its folder knows it: the data, where the files go, and the
    fingerprint a rerun must match to resume."""

    out: Path
    data: Dataset
    identity: Identity
    fingerprint: dict

    @property
    def batch_size(self) -> int:
        return self.fingerprint["batch_size"]

    @property
    def chunk_dir(self) -> Path:
        return self.out / CHUNK_DIR

    @property
    def n_chunks(self) -> int:
        return -(-len(self.data) // self.batch_size)


def fingerprint(model: Path, model_sha256: str, data: dict, *, split: str, batch_size: int, normalize: str,
                dtype: str, on_error: str, top_k: int, images: tuple[str, list[int]] | None = None,
                constants_sha256: str | None = None) -> dict:
    """What job.json records: every input that changes the result files. ``images``:
    ``(invert, image_size)`` for a folder of image files."""
    job = {"gpu_mdf": __version__, "model_sha256": model_sha256, "model": str(model), "data": data,
           "split": split, "batch_size": batch_size, "normalize": normalize, "dtype": dtype,
           "on_error": on_error, "top_k": top_k}
    if images is not None:
        job["invert"], job["image_size"] = images
    if constants_sha256 is not None:
        job["constants_sha256"] = constants_sha256
    return job


def claim(out: Path, job: dict, overwrite: bool = False) -> Path:
    """Make ``out`` ours: new, or holding this very job (resume). Another job's files
    are refused, or replaced with ``overwrite``; stale temporary files of an
    interrupted write are removed. Returns the chunk folder."""
    out.mkdir(parents=True, exist_ok=True)
    chunk_dir = out / CHUNK_DIR
    job_path = out / JOB_FILE
    ours = [p for p in out.iterdir() if p.name in FINAL_FILES or p.name in (CHUNK_DIR, JOB_FILE)]
    if job_path.exists():
        old = _read_job(job_path)
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


def _read_job(job_path: Path):
    try:
        return json.loads(job_path.read_text())
    except ValueError:
        return None


def _remove(paths):
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def finished(out: Path, job: dict) -> InferResult | None:
    """The result of this very job when it has completed in ``out`` already."""
    try:
        if json.loads((out / JOB_FILE).read_text()) != job or (out / CHUNK_DIR).exists():
            return None
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not all((out / f).exists() for f in ("probabilities.npy", "predictions.csv")):
        return None
    files = {key: out / name for key, name in _RESULT_FILES.items() if (out / name).exists()}
    return InferResult.of(out, metrics, files, metrics["chunks"])
