"""The final files of a job, assembled by streaming its chunks (memory stays bounded).

* ``outputs/NAME.npy``: every output of the graph as it came (NaN rows for skipped items);
* ``predictions.csv``: one row per item, as the scored output's reading says
  (:mod:`.scoring`): the predicted class with its probability or score, the true
  label, a low-confidence flag, the top k; or the value of a one-value output;
* ``probabilities.npy``: the class probabilities, where the scored output gives them
  (softmax applied when it was asked or the output is logits);
* ``submission.csv`` (``--kaggle``): Kaggle's ``ImageId,Label``;
* ``errors.csv`` (skipped items) and ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..engine import Program, cpu_threads
from ..errors import DataError
from ..io import atomic_path, write_json
from .chunks import read_chunk
from .jobdir import OUTPUTS_DIR, InferResult, Job
from .scoring import Accuracy, Reading, Stats, read_as, score


@dataclass(frozen=True)
class RunRecord:
    """How this run computed its chunks (what metrics.json says beside the predictions)."""

    seconds: float
    computed: int                 # items computed by this run (resumed chunks not counted)
    resumed: int                  # chunks found finished when it started
    cluster: dict | None = None   # the Dask session's report, when it ran on one


@dataclass
class _Survey:
    """What a first pass over the chunks finds: each output's item shape and type, the
    scored output's values, the errors and the inverted images."""

    shapes: list
    dtypes: list
    stats: Stats = field(default_factory=Stats)
    errors: list[dict] = field(default_factory=list)
    inverted: int = 0


@dataclass
class _Tally:
    """What writing the predictions counts."""

    accuracy: Accuracy | None = None
    low_confidence: int = 0
    missing_from_submission: int = 0


def assemble(prog: Program, job: Job, record: RunRecord, log=print) -> InferResult:
    """Write the final files from the chunk store; returns the job's result."""
    out, fp = job.out, job.fingerprint
    k = [o.name for o in prog.outputs].index(fp["output"])
    survey = _survey(job, k)
    reading = read_as(survey.stats, fp["output"], fp["softmax"])
    log(reading.note)
    if fp["kaggle"] and reading.classes is None:
        raise DataError(f"--kaggle: {reading.note}; a submission needs a predicted class per image")
    files = _write_outputs(prog, job, survey)
    tally = _write_predictions(job, k, reading, files)
    if tally.missing_from_submission:
        log(f"submission.csv: {tally.missing_from_submission} skipped image(s) have no label there")
    if survey.errors or fp["on_error"] == "skip":
        files["errors"] = _write_errors(out / "errors.csv", survey.errors)
    metrics = _metrics(prog, job, record, survey, reading, tally, files)
    files["metrics"] = write_json(out / "metrics.json", metrics)
    return InferResult.of(out, metrics, files, record.resumed)


def _survey(job: Job, k: int) -> _Survey:
    first = read_chunk(job.chunk_dir, 0)
    survey = _Survey([a.shape[1:] for a in first.outputs], [_file_dtype(a) for a in first.outputs])
    for i in range(job.n_chunks):
        chunk = first if i == 0 else read_chunk(job.chunk_dir, i)
        survey.errors += chunk.errors
        survey.inverted += chunk.inverted
        survey.stats.add(chunk.outputs[k])
        for j, a in enumerate(chunk.outputs):      # a chunk of skipped items only has a guessed shape
            if not np.isnan(a).all() and a.shape[1:] != survey.shapes[j]:
                survey.shapes[j], survey.dtypes[j] = a.shape[1:], _file_dtype(a)
    return survey


def _file_dtype(a: np.ndarray) -> np.dtype:
    return a.dtype if a.dtype.kind == "f" else np.dtype(np.float64)


def output_files(prog: Program) -> list[str]:
    """``outputs/NAME.npy`` for each output: the name made a plain file name, unique."""
    names: list[str] = []
    for o in prog.outputs:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", o.name).strip("._") or "output"
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return [f"{OUTPUTS_DIR}/{n}.npy" for n in names]


def _write_outputs(prog: Program, job: Job, survey: _Survey) -> dict:
    """outputs/NAME.npy, every output of every chunk, streamed."""
    files = {}
    with contextlib.ExitStack() as stack:
        arrays = []
        for o, rel, shape, dtype in zip(prog.outputs, output_files(prog), survey.shapes, survey.dtypes):
            tmp = stack.enter_context(atomic_path(job.out / rel))
            arrays.append(np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(job.data),) + shape))
            files[f"output:{o.name}"] = job.out / rel
        for i in range(job.n_chunks):
            lo = i * job.batch_size
            for a, part in zip(arrays, read_chunk(job.chunk_dir, i).outputs):
                a[lo:lo + len(part)] = part if part.shape[1:] == a.shape[1:] else np.nan
        for a in arrays:
            a.flush()
        del arrays
    return files


def _write_predictions(job: Job, k: int, reading: Reading, files: dict) -> _Tally:
    """predictions.csv, and probabilities.npy and submission.csv where they apply."""
    ds, fp, out = job.data, job.fingerprint, job.out
    tally = _Tally(Accuracy(reading.classes, ds.labels) if reading.classes and ds.labels is not None else None)
    with contextlib.ExitStack() as stack:
        writer = csv.writer(stack.enter_context(open(stack.enter_context(atomic_path(out / "predictions.csv")),
                                                     "w", newline="")))
        writer.writerow(_header(reading, ds.labels is not None, fp["top_k"]))
        files["predictions"] = out / "predictions.csv"
        probs = submission = None
        if reading.probabilities and not reading.one_column:
            probs = np.lib.format.open_memmap(stack.enter_context(atomic_path(out / "probabilities.npy")), mode="w+",
                                              dtype=np.float32, shape=(len(ds), reading.classes))
            files["probabilities"] = out / "probabilities.npy"
        if fp["kaggle"]:
            submission = csv.writer(stack.enter_context(open(stack.enter_context(
                atomic_path(out / "submission.csv")), "w", newline="")))
            submission.writerow(["ImageId", "Label"])
            files["submission"] = out / "submission.csv"
        for i in range(job.n_chunks):
            lo = i * job.batch_size
            scored = score(reading, read_chunk(job.chunk_dir, i).outputs[k], fp["top_k"])
            truth = ds.labels[lo:lo + len(scored.valid)] if ds.labels is not None else None
            writer.writerows(_rows(lo, ds, reading, scored, truth, fp))
            if tally.accuracy is not None:
                tally.accuracy.add(lo, scored)
            if reading.probabilities:
                tally.low_confidence += int((scored.confidence[scored.valid] < fp["min_confidence"]).sum())
            if probs is not None:
                probs[lo:lo + len(scored.values)] = scored.values
            if submission is not None:
                submission.writerows((lo + j + 1, int(scored.predicted[j])) for j in np.flatnonzero(scored.valid))
                tally.missing_from_submission += int((~scored.valid).sum())
        if probs is not None:
            probs.flush()
            del probs
    return tally


def _header(reading: Reading, has_labels: bool, top_k: int) -> list[str]:
    header = ["index", "source"]
    if reading.one_column:
        header += ["value"] + (["predicted", "probability"] if reading.classes else [])
    elif reading.classes:
        header += ["predicted", reading.column]
    header += ["true"] if has_labels else []
    header += ["low_confidence"] if reading.probabilities else []
    if reading.classes and not reading.one_column:
        header += [h for j in range(1, top_k + 1) for h in (f"top{j}", f"top{j}_{reading.column}")]
    return header


def _rows(lo: int, ds, reading: Reading, scored, truth: np.ndarray | None, fp: dict) -> list[list]:
    """predictions.csv rows of one chunk (a skipped item: class -1, values nan)."""
    rows = []
    for j in range(len(scored.valid)):
        row = [lo + j, ds.item_name(lo + j)]
        ok = bool(scored.valid[j])
        if reading.one_column:
            row.append(f"{scored.values[j, 0]:.6g}" if ok else "nan")
        if reading.classes:
            row += [int(scored.predicted[j]), f"{scored.confidence[j]:.6f}" if ok else "nan"]
        if truth is not None:
            row.append(int(truth[j]))
        if reading.probabilities:
            row.append(int(ok and scored.confidence[j] < fp["min_confidence"]))
        if scored.top is not None:
            row += [v for c in scored.top[j] for v in ((int(c), f"{scored.values[j, c]:.6f}") if ok else (-1, "nan"))]
        rows.append(row)
    return rows


def _write_errors(path: Path, errors: list[dict]) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["index", "item", "error"])
            writer.writeheader()
            writer.writerows(errors)
    return path


def normalization_applied(prog: Program, mode: str, data_dtype) -> str:
    """Where the pixel normalisation ``mode`` was applied, as :meth:`Program.prepare` and
    the host step of float chunks apply it: integer pixels on the device when the graph's
    input takes floats; float pixels on the host; nothing for a graph that takes integers."""
    spec = prog.primary_input
    takes_integers = np.dtype(spec.dtype).kind in "iub" and not spec.follows_feed
    if mode == "none":
        return "no"
    if np.dtype(data_dtype).kind in "iub":
        return (f"no: the graph takes integers ({spec.dtype}), fed as they are" if takes_integers
                else "on the device")
    return "on the host (float pixels)"


def _metrics(prog: Program, job: Job, record: RunRecord, survey: _Survey, reading: Reading, tally: _Tally,
             files: dict) -> dict:
    ds, fp, n = job.data, job.fingerprint, len(job.data)
    m = {"timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
         "images": n, "skipped": len(survey.errors), "source": ds.name,
         "data": job.identity.describe(ds), "model": fp["model"], "model_sha256": fp["model_sha256"],
         "batch_size": fp["batch_size"], "chunks": job.n_chunks, "chunks_resumed": record.resumed,
         "images_per_s": (record.computed / record.seconds) if record.seconds and record.computed else 0.0,
         "seconds": record.seconds, "device": prog.backend.device, "backend": prog.backend.name,
         "device_reason": prog.backend.reason,
         "normalize": {"mode": fp["normalize"], "applied": normalization_applied(prog, fp["normalize"], ds.dtype)},
         "output": {"name": fp["output"], "kind": reading.kind, "softmax_applied": reading.softmax,
                    "classes": reading.classes, "note": reading.note},
         "outputs": [{"name": o.name, "file": str(files[f"output:{o.name}"].relative_to(job.out)),
                      "shape": ["N", *shape], "dtype": str(dtype)}
                     for o, shape, dtype in zip(prog.outputs, survey.shapes, survey.dtypes)],
         "files": sorted(str(p.relative_to(job.out)) for k, p in files.items() if not k.startswith("output:")),
         "host": {"cpu": _cpu_model(), "threads": cpu_threads(), "platform": platform.platform()},
         "versions": _versions(prog)}
    if reading.probabilities:
        m["low_confidence"] = {"threshold": fp["min_confidence"], "count": tally.low_confidence}
    if tally.accuracy is not None:
        m.update(tally.accuracy.metrics(fp["output"]))
    if "invert" in fp:
        m["invert"] = {"mode": fp["invert"], "images_inverted": survey.inverted, "image_size": fp["image_size"]}
    if record.cluster:
        m["device"] = record.cluster["kind"]
        m["device_reason"] = "Dask workers (see cluster)"
        m["cluster"] = record.cluster
    return m


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



def save_images(ds, n: int, folder: Path, size: tuple[int, int]) -> Path:
    """The first ``n`` items as the model gets them (after polarity and cleaning, before
    normalisation) as ``folder/NNNNNN.png``, greyscale, white digits on black."""
    from PIL import Image

    from ..data.polarity import full_scale
    x = ds.read(0, min(n, len(ds)))
    if int(np.prod(x.shape[1:])) != size[0] * size[1]:
        raise DataError(f"--save-preprocessed: the items of {ds.name} {tuple(x.shape[1:])} are not {size} images")
    x = x.reshape((len(x),) + tuple(size))
    if x.dtype != np.uint8:
        x = np.clip(np.nan_to_num(x.astype(np.float64)) * (255.0 / full_scale(x)), 0, 255).round().astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(x):
        with atomic_path(folder / f"{i:06d}.png") as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
    return folder
