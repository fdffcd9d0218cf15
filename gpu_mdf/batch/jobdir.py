"""The job folder: ``job.json`` (the job's fingerprint), the chunk store, the final files.

A folder belongs to one job. A rerun with the same fingerprint resumes (or finds the
job complete already); another job's files are refused, or replaced with
``overwrite``, never mixed; an unfinished job that saved nothing gives way. Without
``--out`` each job gets a folder of its own under ``runs/infer/``.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..data import Dataset, Identity
from ..errors import OutputError
from ..io import write_json

CHUNK_DIR = ".chunks"
JOB_FILE = "job.json"
OUTPUTS_DIR = "outputs"                  # outputs/NAME.npy: every output of the graph
PREPROCESSED_DIR = "preprocessed"        # --save-preprocessed: what the model got, as PNG
_RESULT_FILES = {"probabilities": "probabilities.npy", "predictions": "predictions.csv",
                 "metrics": "metrics.json", "errors": "errors.csv", "submission": "submission.csv"}
FINAL_FILES = (*_RESULT_FILES.values(), OUTPUTS_DIR, PREPROCESSED_DIR)
# fingerprint keys that change only how the saved chunks are written out, not the chunks
ASSEMBLY_KEYS = ("top_k", "output", "softmax", "min_confidence", "kaggle")
DEFAULT_ROOT = Path("runs") / "infer"


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

    @property
    def low_confidence(self) -> int | None:
        """Items whose top probability is under --min-confidence (None: the output gives none)."""
        return self.metrics.get("low_confidence", {}).get("count")

    def summary(self) -> str:
        """The one line ``gpu-mdf infer`` ends with."""
        m = self.metrics
        acc = f"accuracy {self.accuracy:.4f}, " if self.accuracy is not None else \
            (f"{m['accuracy_note']}, " if m.get("accuracy_note") else "")
        low = "" if self.low_confidence is None else \
            f"{self.low_confidence} below --min-confidence {m['low_confidence']['threshold']:g}, "
        return (f"{self.n} images, {acc}{low}{self.images_per_s:,.0f} images/s on {self.device}"
                + (f", {self.skipped} skipped (errors.csv)" if self.skipped else "") + f"; files in {self.out_dir}")


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
                dtype: str, on_error: str, top_k: int, output: str, softmax: str, min_confidence: float,
                kaggle: bool, images: tuple[str, list[int]] | None = None,
                constants_sha256: str | None = None, opset: int | None = None,
                precision: str | None = None) -> dict:
    """What job.json records: every input that changes the result files. ``images``:
    ``(invert, image_size)`` for a source of images."""
    job = {"gpu_mdf": __version__, "model_sha256": model_sha256, "model": str(model), "data": data,
           "split": split, "batch_size": batch_size, "normalize": normalize, "dtype": dtype,
           "on_error": on_error, "top_k": top_k, "output": output, "softmax": softmax,
           "min_confidence": min_confidence, "kaggle": kaggle}
    if images is not None:
        job["invert"], job["image_size"] = images
    if constants_sha256 is not None:
        job["constants_sha256"] = constants_sha256
    if opset is not None:
        job["opset"] = opset
    if precision not in (None, "fp32"):
        job["precision"] = precision
    return job


def claim(out: Path, job: dict, overwrite: bool = False, log=print) -> Path:
    """Make ``out`` ours: new, or holding this very job (resume). Another job's files
    are refused, or replaced with ``overwrite``; an unfinished job that saved nothing
    (one that failed at once) is replaced, and one that differs only in how its chunks
    are written out is resumed with the new options. Stale temporary files of an
    interrupted write are removed. Returns the chunk folder."""
    out.mkdir(parents=True, exist_ok=True)
    chunk_dir = out / CHUNK_DIR
    job_path = out / JOB_FILE
    ours = [p for p in out.iterdir() if p.name in FINAL_FILES or p.name in (CHUNK_DIR, JOB_FILE)]
    if job_path.exists():
        old = _read_job(job_path)
        if old != job:
            takeover = None if overwrite else _takeover(out, old, job)
            if takeover is None and not overwrite:
                changed = _changed(old, job) if isinstance(old, dict) else ["an unreadable job.json"]
                raise OutputError(f"{out} holds another job's files (different {', '.join(changed)}); "
                                  f"use another --out, or --overwrite to replace them")
            if takeover:
                log(takeover)
            if overwrite or not _chunks(out):
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


def _changed(old: dict, job: dict) -> list[str]:
    return sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))


def _chunks(out: Path) -> list[Path]:
    return list((out / CHUNK_DIR).glob("*.npz")) if (out / CHUNK_DIR).is_dir() else []


def _takeover(out: Path, old, job: dict) -> str | None:
    """Why an unfinished job in ``out`` may give way to ``job`` (None: it may not). A job
    that saved no chunk loses nothing; one that differs only in ASSEMBLY_KEYS keeps its
    chunks. A finished job (metrics.json written) is never taken over."""
    if (out / "metrics.json").exists():
        return None
    saved = len(_chunks(out))
    if not saved:
        return f"{out}: an earlier job stopped before saving any result; this one takes its place"
    if isinstance(old, dict) and set(_changed(old, job)) <= set(ASSEMBLY_KEYS):
        return (f"{out}: the unfinished job's {saved} saved chunk(s) are kept; its files will be written with "
                f"the new {', '.join(_changed(old, job))}")
    return None


def default_folder(model: Path, data_name: str, job: dict, root: Path = DEFAULT_ROOT) -> Path:
    """``runs/infer/<model>-<data>``, or ``-2``, ``-3``... after it: the first folder that
    holds this very job or can be given to it, so that another job never clashes with
    an earlier one and a rerun finds its own folder again."""
    stem = re.sub(r"\.(mdf\.)?(json|ya?ml|bson)$", "", model.name)
    data = re.sub(r"\.(npy|npz|csv)(?=$|-)", "", Path(data_name.replace(":", "-")).name)
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{stem}-{data}").strip(".-") or "job"
    folders = ((root / (base if n == 1 else f"{base}-{n}")).resolve() for n in itertools.count(1))
    return next(folder for folder in folders if _free_for(folder, job))


def _free_for(folder: Path, job: dict) -> bool:
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    old = _read_job(folder / JOB_FILE) if (folder / JOB_FILE).exists() else None
    if old is None:
        return not any(p.name in FINAL_FILES or p.name == CHUNK_DIR for p in folder.iterdir())
    return old == job or _takeover(folder, old, job) is not None


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
    if not (out / "predictions.csv").exists() or not (out / OUTPUTS_DIR).is_dir():
        return None
    files = {key: out / name for key, name in _RESULT_FILES.items() if (out / name).exists()}
    files.update({f"output:{o['name']}": out / o["file"] for o in metrics.get("outputs", [])})
    return InferResult.of(out, metrics, files, metrics["chunks"])
