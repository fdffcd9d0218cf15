"""Start ``gpu-mdf serve`` in a child process on a free loopback port and wait until it
is ready (for tests, benchmarks and scripts that need a real server).

    with launched("models/", "--token-file", "t.txt") as srv:
        urllib.request.urlopen(srv.url + "/v2/health/ready")
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Launched:
    proc: subprocess.Popen
    url: str = ""
    grpc_address: str = ""                             # host:port when started with --grpc-port
    lines: list[str] = field(default_factory=list)    # everything the server wrote to stderr

    @property
    def address(self) -> str:
        return self.url.removeprefix("http://")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def launch(repository, *args: str, timeout: float = 120, env: dict | None = None,
           python: str | None = None, cwd: str | None = None) -> Launched:
    """``python`` (default: this one) runs ``-m gpu_mdf serve`` on port 0 with ``args``."""
    cmd = [python or sys.executable, "-m", "gpu_mdf", "serve", "--model-repository", str(repository), "--port", "0",
           *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, cwd=cwd)
    srv = Launched(proc)
    started = threading.Event()

    def read():
        for line in proc.stderr:
            srv.lines.append(line.rstrip("\n"))
            m = re.search(r" on (http://\S+) \(KServe v2(?:, gRPC on (\S+))?", line)
            if m:
                srv.url, srv.grpc_address = m.group(1), (m.group(2) or "").rstrip(";")
                started.set()
        started.set()
    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not started.wait(0.1):
        if time.monotonic() > deadline:
            srv.stop()
            raise RuntimeError("the server did not start in time:\n" + "\n".join(srv.lines[-20:]))
    if not srv.url:
        srv.stop()
        raise RuntimeError("the server exited:\n" + "\n".join(srv.lines[-20:]))
    return srv


@contextlib.contextmanager
def launched(repository, *args: str, **kw):
    srv = launch(repository, *args, **kw)
    try:
        yield srv
    finally:
        srv.stop()
