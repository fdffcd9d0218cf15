"""Scale bulk inference out on Dask: many processes, many GPUs, many nodes.

``--cluster`` takes:

* ``local`` / ``local:N``: a ``LocalCluster`` of N worker processes, one thread and
  one BLAS thread each (Dask's nanny sets ``OPENBLAS_NUM_THREADS=1``);
* ``cuda``: a ``dask_cuda.LocalCUDACluster``, one worker per visible GPU;
* ``tcp://HOST:PORT`` (any Dask address): join an existing cluster, e.g. one
  started by ``dask-jobqueue`` on SLURM/PBS or by ``dask scheduler`` +
  ``dask cuda worker``.

Each task is a :class:`~gpu_mdf.batch.chunks.ChunkTask` and a chunk number, run by
:func:`~gpu_mdf.batch.chunks.process_chunk`: the worker reads its images from the
shared (absolute) path itself (nothing large goes through the scheduler), compiles
the MDF program once per worker process (cached here), and writes the chunk file
atomically into the job's chunk store. A worker that dies costs only its unfinished
chunks, which Dask reruns elsewhere; finished chunk files stay. Dask is imported
only when a cluster is asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass

from ..data import Dataset
from ..engine import Program, cpu_threads
from ..errors import DeviceError, GpuMdfError
from .chunks import ChunkTask, DataRef, ModelRef, process_chunk

_PROGRAMS: dict[ModelRef, Program] = {}   # per worker process: each model compiled once
_DATASETS: dict[DataRef, Dataset] = {}    # per worker process: each source opened once


def _chunk_task(task: ChunkTask, i: int) -> dict:
    """Run on a worker: one chunk into the chunk store; returns who did what, how fast."""
    from distributed import get_worker
    from threadpoolctl import threadpool_limits

    from ..engine.alloc import tune_host_allocator
    tune_host_allocator()   # a worker process is ours too (Dask's nanny asks glibc to trim eagerly)
    t0 = time.perf_counter()
    if task.model not in _PROGRAMS:
        _PROGRAMS[task.model] = task.model.compile()
    if task.data not in _DATASETS:
        _DATASETS[task.data] = task.data.open()
    prog = _PROGRAMS[task.model]
    with threadpool_limits(1, user_api="blas"):   # as in the single-process job: same bytes
        n = process_chunk(prog, _DATASETS[task.data], i, task.spec)
    return {"worker": get_worker().address, "images": n, "seconds": time.perf_counter() - t0,
            "device": prog.backend.device, "pid": os.getpid()}


@dataclass
class ClusterSession:
    spec: str
    kind: str
    client: object
    cluster: object | None = None

    @classmethod
    def connect(cls, spec: str, log=print, timeout: float = 10.0) -> ClusterSession:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise GpuMdfError("--cluster needs Dask: pip install 'gpu-mdf[dask]'") from None
        spec = spec.strip()
        m = re.fullmatch(r"local(?::(\d+))?", spec)
        if m:
            n = int(m.group(1) or cpu_threads())
            if n < 1:
                raise GpuMdfError(f"--cluster {spec}: need at least one worker")
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                   dashboard_address=":0", silence_logs=logging.ERROR)
            return cls(spec, f"local:{n}", Client(cluster), cluster)
        if spec == "cuda":
            try:
                from dask_cuda import LocalCUDACluster
            except ImportError:
                raise GpuMdfError("--cluster cuda needs dask-cuda: pip install 'gpu-mdf[cuda-cluster]'") from None
            try:
                cluster = LocalCUDACluster(dashboard_address=":0", silence_logs=logging.ERROR)
            except Exception as e:
                raise DeviceError(f"--cluster cuda: no CUDA cluster could start ({type(e).__name__}: {e})") \
                    from None
            return cls(spec, "cuda", Client(cluster), cluster)
        if "://" not in spec:
            raise GpuMdfError(f"--cluster {spec!r}: expected local, local:N, cuda or a scheduler address "
                              f"such as tcp://host:8786")
        try:
            client = Client(spec, timeout=timeout)
        except (OSError, TimeoutError) as e:
            raise GpuMdfError(f"cannot reach the Dask scheduler at {spec} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'timed out'})") from None
        return cls(spec, "remote", client)

    def workers(self) -> dict:
        """Worker address -> thread count (all workers)."""
        return self.client.nthreads()

    def describe(self) -> str:
        n = len(self.workers())
        dash = getattr(self.client, "dashboard_link", None)
        return f"Dask cluster {self.kind} ({self.spec}), {n} worker(s)" + (f"; dashboard {dash}" if dash else "")

    def run_chunks(self, task: ChunkTask, todo: list[int], on_done) -> dict:
        """Run every chunk in ``todo``; ``on_done(images)`` after each. Returns cluster metrics."""
        from distributed import as_completed

        futures = [self.client.submit(_chunk_task, task, i, key=f"gpu-mdf-{task.model.model_sha256[:8]}-{i}",
                                      pure=False, retries=2) for i in todo]
        per_worker: dict = {}
        try:
            for fut in as_completed(futures):
                r = fut.result()   # a task's GpuMdfError (bad image...) is re-raised here
                w = per_worker.setdefault(r["worker"], {"images": 0, "seconds": 0.0, "chunks": 0,
                                                         "device": r["device"]})
                w["images"] += r["images"]
                w["seconds"] += r["seconds"]
                w["chunks"] += 1
                on_done(r["images"])
        except BaseException:
            self.client.cancel(futures)
            raise
        for w in per_worker.values():
            w["images_per_s"] = w["images"] / w["seconds"] if w["seconds"] else 0.0
        return {"kind": self.kind, "spec": self.spec, "workers": len(self.workers()),
                "dashboard": getattr(self.client, "dashboard_link", None), "per_worker": per_worker}

    def close(self):
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


@contextlib.contextmanager
def cluster_session(cluster, log=print, timeout: float = 10.0):
    """``None`` -> None; an open :class:`ClusterSession` -> itself (its owner closes it);
    a spec -> a session connected here (before the caller writes anything) and closed here."""
    if not cluster:
        yield None
    elif isinstance(cluster, ClusterSession):
        yield cluster
    else:
        session = ClusterSession.connect(cluster, log, timeout)
        try:
            yield session
        finally:
            session.close()
