"""``POST /v2/convert``'s work: an uploaded ``.keras`` or ``.h5`` file converted to MDF
JSON by :mod:`.convert_worker` in a child process with memory and CPU-time limits, one
conversion at a time and at most four waiting.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from ..extras import hint, installed
from .errors import Unavailable, Unimplemented, Unprocessable, UnsupportedMediaType

MAX_WAITING = 4


def upload_suffix(upload: bytes) -> str:
    """``.keras`` (a zip) or ``.h5`` (HDF5), told by the first bytes."""
    if upload[:4] == b"PK\x03\x04":
        return ".keras"
    if upload[:8] == b"\x89HDF\r\n\x1a\n":
        return ".h5"
    raise UnsupportedMediaType("the upload is neither a .keras archive (zip) nor an .h5 (HDF5) file")


class Converter:
    """Uploads converted one at a time, in a child process each; at most MAX_WAITING wait."""

    def __init__(self, memory: int, seconds: int, log):
        self.memory, self.seconds, self.log = memory, seconds, log
        self._slot = asyncio.Semaphore(1)
        self._waiting = 0

    async def convert(self, upload: bytes, normalize: str, model_id: str) -> bytes:
        """The upload's MDF JSON, or Unprocessable (422) with the converter's reason."""
        if not installed("keras"):
            raise Unimplemented(hint("keras", "conversion on this server"))
        suffix = upload_suffix(upload)
        if self._waiting >= MAX_WAITING:
            raise Unavailable(f"{MAX_WAITING} conversions are already waiting; retry later")
        self._waiting += 1
        try:
            async with self._slot:
                return await run_in_threadpool(self._run_worker, upload, suffix, normalize, model_id)
        finally:
            self._waiting -= 1

    def _run_worker(self, upload: bytes, suffix: str, normalize: str, model_id: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix="gpu-mdf-convert-") as tmp:
            src, out = Path(tmp) / f"upload{suffix}", Path(tmp) / "model.mdf.json"
            src.write_bytes(upload)
            cmd = [sys.executable, "-m", "gpu_mdf.serve.convert_worker", str(src), str(out), normalize, model_id,
                   str(self.memory), str(self.seconds)]
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
            try:
                worker = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True,
                                        timeout=self.seconds + 30)
            except subprocess.TimeoutExpired:
                raise Unprocessable(f"the conversion took over {self.seconds + 30} s and was stopped") from None
            if worker.returncode != 0 or not out.exists():
                raise Unprocessable(f"conversion refused: {self._refusal(worker)}")
            return out.read_bytes()

    def _refusal(self, worker: subprocess.CompletedProcess) -> str:
        """Why the worker gave no MDF: its one-line reason (exit 2), or how it stopped."""
        lines = [line for line in worker.stderr.strip().splitlines() if line.strip()]
        if worker.returncode == 2 and lines:
            return lines[-1]
        if lines:
            self.log(f"conversion worker failed: {lines[-1]}")
        limit = ", over its CPU or memory limit" if worker.returncode < 0 else ""
        return f"the converter stopped (exit {worker.returncode}{limit})"
