"""The one backend seam: an array module ``xp`` (cupy on a GPU, numpy otherwise).

``select_backend("auto")`` picks CuPy when it imports and sees a CUDA device, and
otherwise NumPy, and records *why* in ``Backend.reason`` so callers can say which
device ran and why. ``"cpu"``, ``"gpu"`` and ``"gpu:N"`` force a choice; asking
for a GPU that cannot be used raises :class:`DeviceError`.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from ..errors import DeviceError


def cpu_threads() -> int:
    """The cores this process may run on (its affinity mask, which a container or
    ``taskset`` narrows; ``os.cpu_count()`` counts the whole machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_BLAS = None


def blas_threads(n: int):
    """A context manager limiting BLAS to ``n`` threads. threadpoolctl's controller is
    made once a process: making it scans every loaded library (2 ms here, 6 ms beside
    TensorFlow), which a run that limits BLAS per batch would pay per batch."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=n, user_api="blas")


@dataclass
class GpuProbe:
    """What CuPy can see. ``usable`` is False with ``reason`` saying why."""

    usable: bool
    reason: str
    cupy: ModuleType | None = None
    devices: list[dict] = field(default_factory=list)
    runtime_version: int | None = None
    driver_version: int | None = None


def probe_gpu() -> GpuProbe:
    """Find out whether CuPy can run here, without raising."""
    try:
        import cupy
    except ImportError as e:
        return GpuProbe(False, f"CuPy is not installed ({e}): pip install 'gpu-mdf[gpu]'")
    except Exception as e:  # a broken CuPy wheel (CUDA version mismatch) raises many types
        return GpuProbe(False, f"CuPy failed to import: {type(e).__name__}: {e}")
    rt = cupy.cuda.runtime
    try:
        driver = rt.driverGetVersion()
    except Exception as e:
        return GpuProbe(False, f"CuPy cannot reach a CUDA driver ({type(e).__name__}: {e})", cupy)
    try:
        runtime = rt.runtimeGetVersion()
    except Exception:
        runtime = None
    try:
        count = rt.getDeviceCount()
    except Exception as e:
        return GpuProbe(False, f"no usable CUDA device ({type(e).__name__}: {e})", cupy,
                        runtime_version=runtime, driver_version=driver)
    if count == 0:
        return GpuProbe(False, "the CUDA driver reports no GPU", cupy,
                        runtime_version=runtime, driver_version=driver)
    if runtime and driver and driver < runtime:
        return GpuProbe(False, f"CUDA driver {driver} is older than the CuPy runtime {runtime}",
                        cupy, runtime_version=runtime, driver_version=driver)
    devices = []
    for i in range(count):
        props = rt.getDeviceProperties(i)
        with cupy.cuda.Device(i):
            free, total = rt.memGetInfo()
        devices.append({"index": i, "name": props["name"].decode(errors="replace"),
                        "memory_total": int(total), "memory_free": int(free),
                        "compute_capability": f"{props['major']}.{props['minor']}"})
    return GpuProbe(True, f"{count} CUDA device(s) visible to CuPy", cupy, devices, runtime, driver)


@dataclass
class Backend:
    """An array module and the device it runs on."""

    name: str            # "numpy" or "cupy"
    xp: ModuleType
    device: str          # "cpu" or "gpu:N"
    reason: str          # why this backend was chosen
    device_index: int | None = None

    @property
    def is_gpu(self) -> bool:
        return self.name == "cupy"

    def describe(self) -> str:
        if self.is_gpu:
            return f"{self.device} ({self.name}): {self.reason}"
        from .ops import cpu
        return f"{self.device} ({self.name}; compiled kernels: {cpu.describe()}): {self.reason}"

    def to_device(self, a):
        return self.xp.asarray(a)

    def to_host(self, a) -> np.ndarray:
        return a.get() if self.is_gpu else np.asarray(a)

    def use(self):
        """Context manager making this backend's device current (no-op on CPU)."""
        if self.is_gpu:
            return self.xp.cuda.Device(self.device_index)
        return contextlib.nullcontext()

    def free_memory(self) -> int | None:
        """Bytes that can still be allocated on the device (None on CPU)."""
        if not self.is_gpu:
            return None
        with self.use():
            free, _ = self.xp.cuda.runtime.memGetInfo()
            pool = self.xp.get_default_memory_pool()
            avail = int(free + pool.free_bytes())
            limit = pool.get_limit()  # a cap set with set_limit / CUPY_GPU_MEMORY_LIMIT
            if limit:
                avail = min(avail, int(limit - pool.used_bytes()))
            return max(avail, 0)

    @contextlib.contextmanager
    def tf32(self):
        """cuBLAS's TensorFloat-32 compute type for float32 products inside the block (CuPy's
        per-dtype compute type, the one ``CUPY_TF32=1`` sets for a whole process), then
        what it was before. The setting is CuPy's, process-wide: a float32 program run by
        another thread meanwhile gets TF32 too (gpu-mdf's commands run one program at a
        time; a server does not offer precisions)."""
        from cupy._core import _routines_linalg as linalg
        before = linalg.get_compute_type(np.float32)
        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32)
        try:
            yield
        finally:
            linalg.set_compute_type(np.float32, before)

    def synchronize(self) -> None:
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()


def select_backend(device: str = "auto", probe: GpuProbe | None = None) -> Backend:
    """Return the backend for ``device`` in ``auto | cpu | gpu | gpu:N``."""
    device = (device or "auto").strip().lower().replace("cuda", "gpu")     # cuda[:N] is gpu[:N]
    m = re.fullmatch(r"(auto|cpu|gpu)(?::(\d+))?", device)
    if not m or (m.group(1) != "gpu" and m.group(2) is not None):
        raise DeviceError(f"unknown device {device!r}; expected auto, cpu, gpu or gpu:N")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return Backend("numpy", np, "cpu", "CPU requested")
    probe = probe or probe_gpu()
    if not probe.usable:
        if kind == "gpu":
            raise DeviceError(f"a GPU was demanded ({device}) but cannot be used: {probe.reason}")
        return Backend("numpy", np, "cpu", f"no GPU used: {probe.reason}")
    idx = int(index or 0)
    if idx >= len(probe.devices):
        raise DeviceError(f"{device}: no such GPU; CuPy sees {len(probe.devices)} device(s)")
    name = probe.devices[idx]["name"]
    why = "GPU requested" if kind == "gpu" else "CuPy sees a GPU"
    return Backend("cupy", probe.cupy, f"gpu:{idx}", f"{why}: {name}", idx)
