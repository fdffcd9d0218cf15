"""Bulk inference: stream a dataset through a compiled MDF program in chunks.

Each finished chunk is written atomically to ``OUT/.chunks/NNNNNN.npz`` beside a
``job.json`` fingerprint (model bytes, input identity, batch size, normalisation...).
A rerun with the same arguments skips finished chunks; a changed model or input is
refused rather than mixed with old chunks (``overwrite`` replaces the other job's
files). The final files (:mod:`.outputs`: every output, ``predictions.csv``,
``metrics.json``...) are assembled by streaming the chunks, so memory stays bounded;
the chunks are then removed (``keep_chunks`` keeps them). Ctrl-C raises
:class:`Interrupted` (the saved chunks are kept for a rerun).
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import InferConfig
from ..data import NORMALIZATIONS, Dataset, open_dataset
from ..data.polarity import check_mode as check_invert
from ..engine import Program, compile, load_constants
from ..errors import DataError, GpuMdfError, OutputError
from ..io import file_sha256
from .chunks import ChunkSpec, ChunkTask, DataRef, ModelRef, run_chunks_here
from .distributed import ClusterSession, cluster_session
from .jobdir import PREPROCESSED_DIR, InferResult, Job, claim, default_folder, fingerprint, finished
from .outputs import RunRecord, assemble, save_images
from .scoring import SOFTMAX_MODES, choose_output


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a job: what was saved and how to resume. A KeyboardInterrupt, so a
    multi-item job stops as a whole and the command exits with 130."""


def run_inference(mdf_path: str | Path, out_dir: str | Path | None, source: str | None = None,
                  split: str = "test", labels: str | None = None, device: str = "auto",
                  batch_size: int | None = None, on_error: str = "fail", program: Program | None = None,
                  progress: bool = True, log=print, normalize: str | None = None,
                  cluster=None, constants: str | Path | None = None, invert: str = "auto", top_k: int = 0,
                  overwrite: bool = False, keep_chunks: bool = False, output: str | None = None,
                  softmax: str = "auto", min_confidence: float = InferConfig.min_confidence, kaggle: bool = False,
                  save_preprocessed: int = 0, opset: int | None = None, cuda_graphs: bool = False,
                  precision: str | None = None) -> InferResult:
    """Run ``mdf_path`` over ``source`` and write the result files to ``out_dir``
    (``None``: a folder of this job's own under ``runs/infer/``).

    ``program`` reuses an already compiled program (multi-item jobs). ``cluster``
    (``local[:N]``, ``cuda`` or a scheduler address) spreads the chunks over Dask
    workers, which write to the same chunk store; the files are the same.
    ``constants``: a ``.npz`` of values for unconnected input ports (weights that an
    exporter wrote as ports). ``normalize`` overrides the graph's pixel normalisation
    (applied to integer pixels on the device, to float pixels on the host; ``none``
    feeds the values as they are). ``invert``: polarity of images (auto | yes | no).
    ``output`` names the scored output and ``softmax`` (auto | yes | no) says how it is
    read (:mod:`.scoring`); ``top_k`` adds the k best classes to predictions.csv;
    ``min_confidence`` flags items whose top probability is under it; ``kaggle`` writes
    submission.csv; ``save_preprocessed`` writes the first N images as the model got them.
    ``opset``: the ONNX opset of a file that does not record it (``onnx_to_mdf``'s).
    ``cuda_graphs``: replay each batch shape's CUDA graph on a GPU (opt-in; not on Dask
    workers, which compile their own programs). ``precision``: ``fp16`` or ``tf32``
    (opt-in, approximate; ``compile(precision=...)``), part of the job's identity.
    """
    from ..convert.sources import resolve_model
    mdf_path = resolve_model(mdf_path, normalize, log=log, need_normalize=True)   # an ONNX file: its cached MDF
    request = _Request(out=None if out_dir is None else Path(out_dir).resolve(), mdf_path=Path(mdf_path).resolve(),
                       source=source, split=split, labels=labels, device=device, batch_size=batch_size,
                       on_error=on_error, normalize=normalize,
                       constants=None if constants is None else Path(constants).resolve(), invert=invert,
                       top_k=top_k, output=output, softmax=softmax, min_confidence=min_confidence, kaggle=kaggle,
                       opset=opset, cuda_graphs=cuda_graphs, precision=precision)
    request.check()
    with cluster_session(cluster, log) as session:   # connects before any file is written
        # with a cluster the workers run the model; here it only describes the graph
        if session and cuda_graphs:
            log("CUDA graphs: not used on Dask workers (each compiles its own program, step by step)")
        prog = program or (request.compile("cpu", describe_only=True) if session else request.compile(device))
        job = request.job(prog, request.open_data(prog))
        result = finished(job.out, job.fingerprint)
        if result is not None:
            log(f"{job.out}: this job is complete already (its files are kept; --overwrite runs it again)")
        else:
            result = _run_job(prog, request, job, session, overwrite, keep_chunks, progress, log)
        if save_preprocessed:
            result.files["preprocessed"] = save_images(job.data, save_preprocessed, job.out / PREPROCESSED_DIR,
                                                       model_image_size(prog))
        return result


def _run_job(prog: Program, request: _Request, job: Job, session: ClusterSession | None, overwrite: bool,
             keep_chunks: bool, progress: bool, log) -> InferResult:
    spec = ChunkSpec(job.batch_size, str(claim(job.out, job.fingerprint, overwrite, log)), request.on_error,
                     job.fingerprint["normalize"])
    log(session.describe() if session else prog.backend.describe())
    log(f"{job.data.describe()}; batch size {job.batch_size}")
    log(_normalization_line(prog, request.normalize, job.fingerprint["normalize"]))
    if request.precision not in (None, "fp32"):
        log(f"precision {request.precision} (approximate: `gpu-mdf bench --precision {request.precision}` "
            f"reports its agreement with float32)")
    record = _run_chunks(prog, job, spec, request.task(prog, job, spec) if session else None, session,
                         progress, log)
    result = assemble(prog, job, record, log)
    if not keep_chunks:
        shutil.rmtree(job.chunk_dir, ignore_errors=True)
    return result


def _normalization_line(prog: Program, asked: str | None, mode: str) -> str:
    """Which pixel normalisation this job uses and who said so (never a silent default)."""
    if asked is not None:
        return f"pixel normalisation: {mode} (--normalize)"
    meta = prog.plan.meta
    if meta.normalize is not None:
        return f"pixel normalisation: {mode} (recorded in the model)"
    return ("pixel normalisation: none: the model records none, so integer pixels are fed as they are "
            "(--normalize l2|scale|none to say otherwise)")


@dataclass(frozen=True)
class _Request:
    """What :func:`run_inference` was asked (the paths of model, constants and output
    made absolute), and the steps that turn it into a job."""

    out: Path | None                     # None: runs/infer/<model>-<data>
    mdf_path: Path
    source: str | None
    split: str
    labels: str | None
    device: str
    batch_size: int | None
    on_error: str
    normalize: str | None                # None: the graph's own
    constants: Path | None
    invert: str
    top_k: int
    output: str | None                   # None: the first class-shaped output
    softmax: str
    min_confidence: float
    kaggle: bool
    opset: int | None = None             # a file that does not say its opset
    cuda_graphs: bool = False            # numbers unchanged: not part of the job's identity
    precision: str | None = None         # fp16 | tf32 (numbers change: part of it)

    def check(self) -> None:
        """Refuse what can be refused before anything is compiled or written."""
        if self.out is not None and self.out.exists() and not self.out.is_dir():
            raise OutputError(f"{self.out}: a file, not a folder; give --out a folder")
        if self.normalize is not None and self.normalize not in NORMALIZATIONS:
            raise DataError(f"unknown normalisation {self.normalize!r}; expected one of {NORMALIZATIONS}")
        if self.softmax not in SOFTMAX_MODES:
            raise DataError(f"softmax must be one of {SOFTMAX_MODES}, got {self.softmax!r}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise DataError(f"min_confidence must be between 0 and 1, got {self.min_confidence}")
        check_invert(self.invert)

    def compile(self, device: str, describe_only: bool = False) -> Program:
        """The job's program (``describe_only``: on the CPU, to describe the graph for Dask
        workers, which compile their own)."""
        return compile(self.mdf_path, device=device, normalize=self.normalize, opset=self.opset,
                       precision=None if describe_only and self.precision == "tf32" else self.precision,
                       cuda_graphs=self.cuda_graphs and not describe_only,
                       constants=None if self.constants is None else load_constants(self.constants))

    def open_data(self, prog: Program) -> Dataset:
        """The dataset, once the program is known to take it (one input, enough classes for top_k)."""
        if prog.primary_input is None:
            raise GpuMdfError(f"{self.mdf_path.name}: bulk inference feeds one input, and this graph takes "
                              f"{[p.describe() for p in prog.inputs] or 'none'}"
                              + (" (bind the others with --constants)" if len(prog.inputs) > 1 else ""))
        scored = prog.outputs[choose_output(prog, self.output)]
        ds = open_dataset(self.source, split=self.split, labels=self.labels, image_size=model_image_size(prog),
                          invert=self.invert)
        if len(ds) == 0:
            raise DataError(f"{ds.name}: no images")
        classes = _n_classes(scored)
        if self.top_k and classes and self.top_k > classes:
            raise DataError(f"--top-k {self.top_k}: the model has {classes} classes")
        if self.kaggle and scored.shape is not None and len(scored.shape) > 2:
            raise DataError(f"--kaggle: output {scored.name} is {scored.describe()}, not one class score an item")
        return ds

    def job(self, prog: Program, ds: Dataset) -> Job:
        """The job, with the fingerprint a rerun must match (see :func:`~.jobdir.fingerprint`)."""
        identity = ds.source.identity()
        job = fingerprint(
            self.mdf_path, file_sha256(self.mdf_path), identity.fingerprint(ds), split=self.split,
            batch_size=prog.suggest_batch_size(self.batch_size), normalize=self.normalize or prog.normalize,
            dtype=str(prog.dtype), on_error=self.on_error, top_k=self.top_k,
            output=prog.outputs[choose_output(prog, self.output)].name, softmax=self.softmax,
            min_confidence=self.min_confidence, kaggle=self.kaggle,
            images=None if ds.inverted is None else (self.invert, list(model_image_size(prog))),
            constants_sha256=None if self.constants is None else file_sha256(self.constants), opset=self.opset,
            precision=self.precision)
        return Job(self.out or default_folder(self.mdf_path, ds.name, job), ds, identity, job)

    def task(self, prog: Program, job: Job, spec: ChunkSpec) -> ChunkTask:
        """What Dask workers are sent: they compile and open for themselves, by absolute paths."""
        model = ModelRef(str(self.mdf_path), job.fingerprint["model_sha256"], self.device, prog.normalize,
                         None if self.constants is None else str(self.constants), self.opset, self.precision)
        data = DataRef(job.identity.location, self.split,
                       None if self.labels is None else str(Path(self.labels).resolve()),
                       model_image_size(prog), self.invert)
        return ChunkTask(model, data, spec)

def model_image_size(prog: Program) -> tuple[int, int]:
    """The (height, width) a folder of images is brought to: the model's own 2-d input
    (with or without a size-1 channel axis), else MNIST's 28x28."""
    item = prog.primary_input.shape[1:] if prog.primary_input.shape else ()
    dims = [d for d in item if d != 1]
    if len(dims) == 2 and all(d > 0 for d in dims):
        return int(dims[0]), int(dims[1])
    return 28, 28


def _n_classes(output) -> int | None:
    shape = output.shape
    return int(shape[-1]) if shape and len(shape) == 2 and shape[-1] > 0 else None


def _run_chunks(prog: Program, job: Job, spec: ChunkSpec, task: ChunkTask | None, session: ClusterSession | None,
                progress: bool, log) -> RunRecord:
    """Run the chunks not yet in the chunk store, here or on the cluster (``task``)."""
    n, bs = len(job.data), job.batch_size
    done = {int(p.stem) for p in job.chunk_dir.glob("*.npz")}
    resumed = len(done & set(range(job.n_chunks)))
    if resumed:
        log(f"resuming: {resumed} of {job.n_chunks} chunks already done")
    todo = [i for i in range(job.n_chunks) if i not in done]
    bar = _progress(n, progress, initial=min(resumed * bs, n))
    t0 = time.perf_counter()
    cluster_report = None
    try:
        if session:
            cluster_report = session.run_chunks(task, todo, bar.update)
        else:
            run_chunks_here(prog, job.data, todo, spec, bar.update)
    except KeyboardInterrupt:
        bar.close()
        saved = len(list(job.chunk_dir.glob("*.npz")))
        raise Interrupted(f"interrupted: {saved} of {job.n_chunks} chunks are saved in {job.chunk_dir}; "
                          f"rerun the same command to resume") from None
    seconds = time.perf_counter() - t0
    bar.close()
    computed = sum(min(bs, n - i * bs) for i in todo)
    return RunRecord(seconds, computed, resumed, cluster_report)


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="img", unit_scale=True, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
