"""Model files converted to MDF JSON in the sandboxed worker (:mod:`.convert_worker`):
``POST /v2/convert``'s uploads (``.keras``, ``.h5`` or ``.onnx``, told by their content)
and a repository's ``model.onnx``. One conversion at a time, at most four uploads waiting;
each result is kept by content hash (with the settings that shaped it) in a cache
bounded in bytes, so the same file converts once.

The worker runs in a temp folder of its own (removed afterwards) under limits on memory,
CPU time, file size and open files, in network and mount namespaces where the OS allows
them (else the folder's size is watched here and the worker stopped past its quota).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..extras import hint, installed
from .errors import Unavailable, Unimplemented, Unprocessable, UnsupportedMediaType

MAX_WAITING = 4
MAX_MEMBERS = 1000


def upload_kind(upload) -> str:
    """``keras`` (a zip), ``h5`` (HDF5) or ``onnx`` (a protobuf ModelProto, which starts
    with its ``ir_version`` field), told by the first bytes, whatever the file was called."""
    head = bytes(upload[:16])
    if head[:4] == b"PK\x03\x04":
        return "keras"
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        return "h5"
    if len(head) > 2 and head[0] == 0x08 and 1 <= head[1] <= 64:
        return "onnx"
    raise UnsupportedMediaType("the upload is not a .keras archive (zip), an .h5 (HDF5) file or an ONNX model")


class Cache:
    """Bytes by key, least recently used dropped past ``limit`` bytes (thread-safe)."""

    def __init__(self, limit: int):
        self.limit, self.size = limit, 0
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.limit:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self.size += len(value)
            while self.size > self.limit:
                self.size -= len(self._items.popitem(last=False)[1])


def folder_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


class Converter:
    """Conversions through the sandboxed worker, one at a time, cached by content."""

    def __init__(self, settings, root: Path | None = None, metrics=None):
        self.metrics = metrics
        self.memory, self.seconds, self.disk = settings.convert_memory, settings.convert_seconds, settings.convert_disk
        self.log = settings.log
        self.cache = Cache(settings.cache_bytes)
        self.isolation = ""
        self._slot = threading.Lock()
        self._waiting = 0

    async def convert(self, upload, normalize: str | None, model_id: str) -> bytes:
        """The upload's MDF JSON, or Unprocessable (422) with the converter's reason."""
        kind = upload_kind(upload)
        if kind in ("keras", "h5") and not installed("keras"):
            raise Unimplemented(hint("keras", "Keras conversion on this server"))
        if kind == "onnx" and not installed("onnx"):
            raise Unimplemented(hint("onnx", "ONNX conversion on this server"))
        key = self.key(upload, kind, normalize, model_id)
        cached = self.cache.get(key)
        if cached is not None:
            self._count("cached")
            return cached
        if self._waiting >= MAX_WAITING:
            raise Unavailable(f"{MAX_WAITING} conversions are already waiting; retry later", {"Retry-After": "5"})
        self._waiting += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self._upload, bytes(upload), kind, normalize, model_id, key)
        finally:
            self._waiting -= 1

    def convert_file(self, path: Path, normalize: str | None, model_id: str) -> bytes:
        """A repository's ``model.onnx`` as MDF JSON (external data inside its folder allowed)."""
        data = path.read_bytes()
        key = self.key(data, "onnx-file", normalize, model_id)
        cached = self.cache.get(key)
        if cached is None:
            cached = self._run(str(path), "onnx", normalize, model_id, upload=False)
            self.cache.put(key, cached)
        else:
            self._count("cached")
        return cached

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("gpu_mdf_conversions_total", {"result": result})

    @staticmethod
    def key(data, kind: str, normalize: str | None, model_id: str) -> str:
        return f"{hashlib.sha256(data).hexdigest()}:{kind}:{normalize}:{model_id}"

    def _upload(self, upload: bytes, kind: str, normalize, model_id: str, key: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix="gpu-mdf-upload-") as tmp:
            src = Path(tmp) / f"upload.{kind}"
            src.write_bytes(upload)
            mdf = self._run(str(src), kind, normalize, model_id, upload=True)
        self.cache.put(key, mdf)
        return mdf

    def _run(self, src: str, kind: str, normalize, model_id: str, upload: bool) -> bytes:
        with self._slot, tempfile.TemporaryDirectory(prefix="gpu-mdf-convert-") as tmp:
            work, out = Path(tmp) / "tmp", Path(tmp) / "model.mdf.json"
            work.mkdir()
            cmd = [sys.executable, "-m", "gpu_mdf.serve.convert_worker", src, str(out), "onnx" if kind == "onnx"
                   else "keras", normalize or "-", model_id, str(self.memory), str(self.seconds), str(self.disk),
                   str(MAX_MEMBERS), "1" if upload else "0"]
            env = {**{k: v for k, v in os.environ.items() if not k.startswith(("HTTP", "HTTPS", "ALL_PROXY"))},
                   "TF_CPP_MIN_LOG_LEVEL": "3", "TMPDIR": str(work), "TEMP": str(work), "TMP": str(work),
                   "HOME": str(work), "KERAS_HOME": str(work)}
            code, stderr = self._watch(subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL,
                                                        stderr=subprocess.PIPE, text=True), str(work))
            lines = [line for line in stderr.strip().splitlines() if line.strip()]
            if lines and lines[0].startswith("isolation:") and self.isolation != lines[0]:
                self.isolation = lines[0]
                self.log(f"conversion sandbox {lines[0]}")
            if code != 0 or not out.exists():
                self._count("refused")
                raise Unprocessable(f"conversion refused: {self._refusal(code, lines)}")
            self._count("converted")
            return out.read_bytes()

    def _watch(self, worker: subprocess.Popen, work: str) -> tuple[int | str, str]:
        """Wait for the worker; stop it past its time, or past its folder's quota."""
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(worker.stderr.read()), daemon=True)
        reader.start()
        deadline = time.monotonic() + self.seconds + 30
        why = None
        while worker.poll() is None:
            if time.monotonic() > deadline:
                why = f"took over {self.seconds + 30} s"
            elif folder_size(work) > self.disk:
                why = f"wrote over its {self.disk:,}-byte disk quota"
            if why:
                worker.kill()
                break
            time.sleep(0.1)
        worker.wait()
        reader.join(10)
        shutil.rmtree(work, ignore_errors=True)
        return (why or worker.returncode), "".join(out)

    def _refusal(self, code, lines: list[str]) -> str:
        """Why the worker gave no MDF: its one-line reason (exit 2), or how it stopped."""
        if isinstance(code, str):
            return f"the converter was stopped: it {code}"
        reasons = [line for line in lines if not line.startswith("isolation:")]
        if code == 2 and reasons:
            return reasons[-1]
        if reasons:
            self.log(f"conversion worker failed: {reasons[-1]}")
        stopped = ", over its CPU, memory or file-size limit" if code < 0 else ""
        return f"the converter stopped (exit {code}{stopped})"
