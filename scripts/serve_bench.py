"""Benchmark `gpu-mdf serve` on loopback, one server process, in one run:

1. 64 concurrent clients, each sending single images (binary tensor data, keep-alive
   connections), against the same model served with dynamic batching on and off:
   images/s, p50/p99 latency, mean device batch size (from /metrics), errors.
2. 1,024-image binary requests from 4 clients: server images/s against calling
   ``program.run`` directly on the same batches in this process (the protocol's cost).

The clients are one asyncio process with hand-made HTTP/1.1 requests (cheap, so that the
server gets the CPU); on a 2-core machine they still share it with the server.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/serve_bench.py \\
        --mdf runs/mnist_dense/model.mdf.json --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_mdf.data import load_mnist  # noqa: E402
from gpu_mdf.engine import compile, tune_host_allocator  # noqa: E402
from gpu_mdf.serve.launch import launched  # noqa: E402


def request_bytes(host: str, model: str, x: np.ndarray, input_name: str) -> bytes:
    head = json.dumps({"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "UINT8",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    body = head + x.tobytes()
    return (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
            f"Inference-Header-Content-Length: {len(head)}\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + body


async def read_response(reader) -> tuple[int, bytes, dict]:
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, v = line.decode().split(":", 1)
        headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return status, body, headers


def outputs_of(body: bytes, headers: dict) -> np.ndarray:
    n = int(headers["inference-header-content-length"])
    meta = json.loads(body[:n])["outputs"][0]
    return np.frombuffer(body[n:], np.float32).reshape(meta["shape"])


async def clients(host, port, requests: list[bytes], n_clients: int, seconds: float, expected=None):
    """n_clients keep-alive connections sending requests[i % len] until time is up."""
    lat, errors, wrong = [], [], [0]
    stop = time.perf_counter() + seconds

    async def one(c):
        reader, writer = await asyncio.open_connection(host, port)
        i = c
        while time.perf_counter() < stop:
            k = i % len(requests)
            t = time.perf_counter()
            writer.write(requests[k])
            status, body, headers = await read_response(reader)
            lat.append(time.perf_counter() - t)
            if status != 200:
                errors.append(status)
            elif expected is not None and i < c + 3 and not np.allclose(outputs_of(body, headers), expected[k],
                                                                           atol=1e-5):
                wrong[0] += 1
            i += n_clients
        writer.close()
    t0 = time.perf_counter()
    await asyncio.gather(*(one(c) for c in range(n_clients)))
    return lat, errors, wrong[0], time.perf_counter() - t0


def batch_stats(metrics_text: str, model: str) -> tuple[float, float]:
    vals = {}
    for ln in metrics_text.splitlines():
        if ln.startswith("gpu_mdf_batch_items_") and f'model="{model}"' in ln and "_bucket" not in ln:
            vals[ln.split("{")[0]] = float(ln.split()[-1])
    return vals.get("gpu_mdf_batch_items_sum", 0.0), vals.get("gpu_mdf_batch_items_count", 0.0)


def metrics(url: str) -> str:
    import urllib.request
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        return r.read().decode()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mdf", default=str(ROOT / "examples" / "mnist_softmax.mdf.json"))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--json", dest="json_out", default=None)
    a = ap.parse_args()
    tune_host_allocator()     # as the gpu-mdf command (the server) does: the direct baseline on equal terms
    (_, _), (xte, _) = load_mnist()
    prog = compile(a.mdf, device="cpu")
    name = prog.primary_input.name
    out = {"mdf": a.mdf, "clients": a.clients, "seconds": a.seconds}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        for model, cfg in (("batched", "dynamic_batching: true\nmax_batch_size: 256\nmax_queue_delay_ms: 2\n"),
                           ("unbatched", "dynamic_batching: false\n"),
                           ("big", "dynamic_batching: false\nmax_batch_size: 1024\n")):
            (repo / model / "1").mkdir(parents=True)
            shutil.copy(a.mdf, repo / model / "1" / "model.mdf.json")
            (repo / model / "config.yaml").write_text(cfg)
        with launched(repo, "--no-access-log") as srv:
            host, port = srv.address.rsplit(":", 1)
            singles = xte[:1024, None]
            expected = prog.run(xte[:1024])
            print(f"server {srv.url}; model {a.mdf}; {a.clients} clients x {a.seconds:g} s each case")
            print(f"\n{'case':<34}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'mean batch':>12}"
                  f"{'errors':>8}{'wrong':>7}")
            rows = {}
            for model in ("unbatched", "batched"):
                reqs = [request_bytes(host, model, singles[i], name) for i in range(len(singles))]
                asyncio.run(clients(host, int(port), reqs, 8, 1.0))                     # warm-up
                s0, c0 = batch_stats(metrics(srv.url), model)
                lat, errors, wrong, secs = asyncio.run(clients(host, int(port), reqs, a.clients, a.seconds, expected))
                s1, c1 = batch_stats(metrics(srv.url), model)
                r = {"images_per_s": len(lat) / secs, "p50_ms": 1e3 * statistics.median(lat),
                     "p99_ms": 1e3 * float(np.percentile(lat, 99)), "mean_batch": (s1 - s0) / max(1, c1 - c0),
                     "requests": len(lat), "errors": len(errors), "wrong": wrong}
                rows[model] = r
                print(f"{'single images, batching ' + ('on' if model == 'batched' else 'off'):<34}"
                      f"{r['images_per_s']:>10,.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['mean_batch']:>12.1f}"
                      f"{r['errors']:>8}{r['wrong']:>7}")
            speedup = rows["batched"]["images_per_s"] / rows["unbatched"]["images_per_s"]
            print(f"batching on / off: {speedup:.1f}x the throughput")
            out["single_images"] = rows
            out["batching_speedup"] = speedup

            big = [request_bytes(host, "big", xte[i * 1024:(i + 1) * 1024], name) for i in range(4)]
            asyncio.run(clients(host, int(port), big, 4, 1.0))
            lat, errors, wrong, secs = asyncio.run(clients(host, int(port), big, 4, a.seconds,
                                                           [prog.run(xte[i * 1024:(i + 1) * 1024]) for i in range(4)]))
            served = 1024 * len(lat) / secs
            times = []
            for _ in range(30):
                t = time.perf_counter()
                prog.run(xte[:1024])
                times.append(time.perf_counter() - t)
            direct = 1024 / statistics.median(times)
            print(f"{'1,024-image requests, 4 clients':<34}{served:>10,.0f}{1e3 * statistics.median(lat):>9.2f}"
                  f"{1e3 * float(np.percentile(lat, 99)):>9.2f}{1024:>12}{len(errors):>8}{wrong:>7}")
            print(f"{'program.run(1,024 images) direct':<34}{direct:>10,.0f}{1e3 * statistics.median(times):>9.2f}")
            print(f"server / direct: {served / direct:.0%}")
            out["big_requests"] = {"images_per_s": served, "direct_images_per_s": direct,
                                   "ratio": served / direct, "errors": len(errors), "wrong": wrong}
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
