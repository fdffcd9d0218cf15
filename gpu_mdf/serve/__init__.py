"""``gpu-mdf serve``: MDF inference and Keras conversion over the KServe v2 protocol
(the Open Inference Protocol that Triton, KServe and MLServer speak), with Triton's
binary tensor data and model repository extensions, dynamic batching, Prometheus
metrics and bearer-token authentication. Needs ``pip install 'gpu-mdf[serve]'``.

Why a thin server of our own on Starlette + uvicorn rather than a custom runtime on
MLServer or the KServe SDK: see the README's design notes (binary tensor data, batching,
install size and start-up time were measured).
"""

from __future__ import annotations

import socket
from pathlib import Path

from ..errors import GpuMdfError
from ..extras import require


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
          token_file: str | None = None, max_body_mb: float = 64, access_log: bool = True,
          graceful_seconds: float = 30, log=None) -> None:
    """Load every model of the repository, then serve until SIGINT/SIGTERM; in-flight
    requests are finished (up to ``graceful_seconds``) and queued batches drained."""
    require("starlette", "gpu-mdf serve")
    uvicorn = require("uvicorn", "gpu-mdf serve")
    from .app import App, Settings, log_to_stderr
    from .metrics import Metrics
    from .repository import Repository

    log = log or log_to_stderr
    token = read_token(token_file) if token_file else None
    metrics = Metrics()
    repo = Repository(model_repository, device=device, metrics=metrics, log=log)
    repo.load_all()
    metrics.gauges.append(lambda: _gauges(repo))
    settings = Settings(max_body=int(max_body_mb * 2**20), token=token, access_log=access_log, log=log)
    app = App(repo, settings, metrics)

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)      # connections made from now on wait in the backlog for uvicorn
    except OSError as e:
        raise GpuMdfError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=graceful_seconds, limit_concurrency=2048)
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its shutdown, which would kill the process
            # before the batchers drain; gpu-mdf drains them, then exits 0
            getattr(self, "_captured_signals", []).clear()
    server = Server(config)
    ready = [m.name for m in repo.models.values() if m.state == "READY"]
    log(f"serving {len(ready)} model(s) {ready} on http://{host}:{bound} "
        f"(KServe v2; token {'required' if token else 'not required'})")
    try:
        server.run(sockets=[sock])
    finally:
        repo.close()
        log("stopped")


def _gauges(repo):
    rows, seen = [], set()
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
    try:
        with open("/proc/self/statm") as f:
            import os
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        rows.append(("gpu_mdf_device_memory_bytes", {"device": "cpu", "kind": "rss"}, rss))
    except OSError:
        pass
    return rows
