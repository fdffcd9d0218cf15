"""Resumable bulk runs: a dataset through a compiled MDF program, chunk by chunk.

* :mod:`.infer`: :func:`run_inference`, one job from arguments to result files;
* :mod:`.chunks`: a chunk read, run and saved; :class:`ChunkTask`, what a Dask worker is sent;
* :mod:`.jobdir`: the job folder (fingerprint, claim, a finished job found again);
* :mod:`.outputs`: the final files (predictions, probabilities, errors, metrics);
* :mod:`.jobs`: several models and sources in one process (:func:`run_jobs`);
* :mod:`.distributed`: the Dask cluster session (:func:`cluster_session`).

Batches run through :func:`gpu_mdf.engine.run_batch`; nothing here evaluates a graph.
"""

from .chunks import ChunkSpec, ChunkTask, DataRef, ModelRef, process_chunk, run_chunks_here
from .distributed import ClusterSession, cluster_session
from .infer import model_image_size, run_inference
from .jobdir import CHUNK_DIR, FINAL_FILES, JOB_FILE, InferResult
from .jobs import run_jobs

__all__ = ["CHUNK_DIR", "FINAL_FILES", "JOB_FILE", "ChunkSpec", "ChunkTask", "ClusterSession", "DataRef",
           "InferResult", "ModelRef", "cluster_session", "model_image_size", "process_chunk", "run_chunks_here",
           "run_inference", "run_jobs"]
