"""``gpu-mdf serve``: MDF inference and model conversion over the KServe v2 protocol
(the Open Inference Protocol that Triton, KServe and MLServer speak), REST with Triton's
binary tensor data and model repository extensions, and gRPC; dynamic batching,
Prometheus metrics, bearer-token authentication, every resource a client can hold
bounded. Needs ``pip install 'gpu-mdf[serve]'`` (``[grpc]`` for gRPC).

Why a thin server of our own on httptools rather than a custom runtime on MLServer or
the KServe SDK, or Starlette on uvicorn (what it ran on before): see the README's design
notes (binary tensor data, batching, timeouts, the CPU a request costs were measured).
"""

from __future__ import annotations

import socket
from pathlib import Path

from ..errors import GpuMdfError
from ..extras import MissingExtra, installed


def need(module: str, name: str, extra: str, purpose: str) -> None:
    """MissingExtra naming the extra, in one line, unless ``module`` is installed."""
    if not installed(module):
        raise MissingExtra(f"{purpose} needs {name}, which is not installed here: pip install 'gpu-mdf[{extra}]'")


def read_token(path: str | Path) -> str:
    p = Path(path)
    try:
        token = p.read_text().strip()
    except OSError as e:
        raise GpuMdfError(f"--token-file {p}: cannot read it ({e.strerror})") from None
    if not token or any(c.isspace() for c in token):
        raise GpuMdfError(f"--token-file {p}: expected one token without spaces")
    return token


def serve(model_repository: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          token_file: str | None = None, limits=None, access_log: bool = True, graceful_seconds: float = 30,
          grpc_port: int | None = None, retain_mb: float = 64, convert_disk: int = 1 << 30, blas_threads: int = 1,
          log=None) -> None:
    """Load every model of the repository, then serve until SIGINT/SIGTERM; in-flight
    requests are finished (up to ``graceful_seconds``) and queued batches drained.
    ``limits`` (:class:`.http.Limits`) bounds time, connections and memory; ``grpc_port``
    (None: no gRPC) serves the same models over the protocol's gRPC form."""
    need("httptools", "httptools", "serve", "gpu-mdf serve")
    from .app import App, Settings, log_to_stderr
    from .conversion import Converter
    from .http import Budget, HTTPServer, Limits
    from .memory import Retention
    from .metrics import Metrics
    from .repository import Repository

    log = log or log_to_stderr
    token = read_token(token_file) if token_file else None
    limits = limits or Limits()
    retention = Retention(int(retain_mb * 2**20))
    settings = Settings(limits=limits, token=token, access_log=access_log, convert_disk=convert_disk, log=log)
    metrics = Metrics()
    repo = Repository(model_repository, device=device, metrics=metrics, log=log)
    repo.converter = Converter(settings, repo.root, metrics)
    sock = _listen(host, port)
    if grpc_port is not None:
        need("grpc", "grpcio", "grpc", "gpu-mdf serve --grpc-port")
    _blas_threads(blas_threads)
    repo.load_all()
    _settle()
    retention.trim()
    app = App(repo, settings, metrics)
    budget = Budget(limits.inflight, on_idle=retention.trim)
    http = HTTPServer(app, limits, budget)
    metrics.gauges.append(lambda: _gauges(repo, budget, http))
    _run(http, sock, repo, app, budget, host, grpc_port, graceful_seconds, token, log)


def _settle() -> None:
    """After loading: what exists now (modules, programs, weights) is left out of the
    cyclic garbage collector's passes, and a young generation of 50,000 objects rather than
    700 makes those passes rarer (a request makes a few hundred short-lived objects and no
    cycles of note): 3-4% of the server's CPU per request, measured."""
    import gc
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _blas_threads(n: int) -> None:
    """BLAS on ``n`` threads for every batch. A server's batches are small, and BLAS
    threads that fight the event loop for the cores made a 128-image batch 10x slower
    here (2 cores: 1.7 ms against 0.17 ms on one thread)."""
    from threadpoolctl import threadpool_limits
    threadpool_limits(n, user_api="blas")


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)      # connections made from now on wait in the backlog
    except OSError as e:
        raise GpuMdfError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def _run(http, sock, repo, app, budget, host, grpc_port, graceful_seconds, token, log) -> None:
    """The event loop (uvloop where installed): HTTP, gRPC, until a signal; then drain."""
    import asyncio
    import signal
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()

    async def main():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await http.start(sock)
        grpc_server, grpc_bound = None, None
        if grpc_port is not None:
            from .grpc_server import start_grpc
            grpc_server, grpc_bound = await start_grpc(app, budget, host, grpc_port, token, http.limits)
        ready = [m.name for m in repo.models.values() if m.state == "READY"]
        where = f"http://{host}:{sock.getsockname()[1]}"
        also = f", gRPC on {host}:{grpc_bound}" if grpc_bound else ""
        log(f"serving {len(ready)} model(s) {ready} on {where} (KServe v2{also}; "
            f"token {'required' if token else 'not required'})")
        await stop.wait()
        if grpc_server is not None:
            await grpc_server.stop(graceful_seconds)
        await http.stop(graceful_seconds)

    try:
        loop.run_until_complete(main())
    finally:
        repo.close()
        loop.close()
        log("stopped")


def _gauges(repo, budget, http):
    rows = [("gpu_mdf_inflight_bytes", {}, budget.used), ("gpu_mdf_connections", {}, len(http.connections))]
    for what, n in (("connections", http.refused), ("memory", http.busy), ("timeout", http.timeouts)):
        rows.append(("gpu_mdf_refused_total", {"reason": what}, n))
    seen = set()
    for m in list(repo.models.values()):
        for v in m.versions.values():
            rows.append(("gpu_mdf_queue_depth", {"model": m.name, "version": v.version}, v.batcher.queued))
            b = v.program.backend
            if b.device in seen or not b.is_gpu:
                continue
            seen.add(b.device)
            with b.use():
                used = b.xp.get_default_memory_pool().used_bytes()
            rows.append(("gpu_mdf_device_memory_bytes", {"device": b.device, "kind": "used"}, used))
            free = b.free_memory()
            if free is not None:
                rows.append(("gpu_mdf_device_memory_bytes", {"device": b.device, "kind": "free"}, free))
    from .memory import rss
    value = rss()
    if value is not None:
        rows.append(("gpu_mdf_device_memory_bytes", {"device": "cpu", "kind": "rss"}, value))
    return rows
