"""Bulk inference, as ``gpu_mdf.infer`` has always offered it: see :mod:`gpu_mdf.batch`."""

from .batch import (
    CHUNK_DIR,
    FINAL_FILES,
    JOB_FILE,
    ChunkSpec,
    InferResult,
    model_image_size,
    process_chunk,
    run_chunks_here,
    run_inference,
)

__all__ = ["CHUNK_DIR", "FINAL_FILES", "JOB_FILE", "ChunkSpec", "InferResult", "model_image_size", "process_chunk",
           "run_chunks_here", "run_inference"]
