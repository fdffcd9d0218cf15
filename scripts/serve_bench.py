"""Benchmark `gpu-mdf serve` on loopback, one server process, in one run:

1. ``--clients`` concurrent clients, each sending single images as binary tensor data
   over keep-alive HTTP/1.1 connections and over gRPC (raw_input_contents), against the
   same model served with dynamic batching on and off: images/s, p50/p99 latency, mean
   device batch size (from /metrics), errors, wrong answers, and the **server's own CPU
   time per request**, read from its process's CPU counters (/proc/PID/stat) around each
   case, with this client in another process.
2. 1,024-image binary requests from 4 clients: server images/s against calling
   ``program.run`` directly on the same batches in this process (the protocol's cost).

The HTTP clients are hand-made HTTP/1.1 requests and the gRPC clients grpc.aio calls,
both in one asyncio process (cheap, so that the server gets the CPU); on a 2-core
machine they still share it with the server.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python scripts/serve_bench.py \\
        --mdf runs/mnist_dense/model.mdf.json --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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

MODELS = (("batched", "dynamic_batching: true\nmax_batch_size: 256\nmax_queue_delay_ms: 2\n"),
          ("unbatched", "dynamic_batching: false\n"),
          ("big", "dynamic_batching: false\nmax_batch_size: 1024\n"))


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


async def http_clients(address, requests: list[bytes], n_clients: int, seconds: float, expected=None):
    """n_clients keep-alive connections sending requests[i % len] until time is up."""
    host, port = address.rsplit(":", 1)
    lat, errors, wrong = [], [], [0]
    stop = time.perf_counter() + seconds

    async def one(c):
        reader, writer = await asyncio.open_connection(host, int(port))
        i = c
        while time.perf_counter() < stop:
            k = i % len(requests)
            t = time.perf_counter()
            writer.write(requests[k])
            status, body, headers = await read_response(reader)
            lat.append(time.perf_counter() - t)
            if status != 200:
                errors.append(status)
            elif expected is not None and i < c + 3 * n_clients and \
                    not np.allclose(outputs_of(body, headers), expected[k], atol=1e-5):
                wrong[0] += 1
            i += n_clients
        writer.close()
    t0 = time.perf_counter()
    await asyncio.gather(*(one(c) for c in range(n_clients)))
    return lat, errors, wrong[0], time.perf_counter() - t0


def infer_messages(model: str, images: np.ndarray, input_name: str) -> list[bytes]:
    """One serialised ModelInferRequest per image (raw_input_contents)."""
    from gpu_mdf.serve.proto import inference_pb2 as pb
    reqs = []
    for x in images:
        r = pb.ModelInferRequest(model_name=model)
        r.inputs.add(name=input_name, datatype="UINT8", shape=[1, *x.shape])
        r.raw_input_contents.append(x.tobytes())
        reqs.append(r.SerializeToString())
    return reqs


async def grpc_clients(address, reqs: list[bytes], n_clients: int, seconds: float, expected=None,
                       method: str = "ModelInfer"):
    """n_clients concurrent loops of one RPC over one channel (ModelInfer by default)."""
    import grpc

    from gpu_mdf.serve.proto import inference_pb2 as pb
    lat, errors, wrong = [], [], [0]
    stop = time.perf_counter() + seconds
    reply_type = getattr(pb, f"{method}Response")
    async with grpc.aio.insecure_channel(address) as channel:
        infer = channel.unary_unary(f"/inference.GRPCInferenceService/{method}",
                                    request_serializer=lambda b: b, response_deserializer=reply_type.FromString)

        async def one(c):
            i = c
            while time.perf_counter() < stop:
                k = i % len(reqs)
                t = time.perf_counter()
                try:
                    reply = await infer(reqs[k])
                except grpc.aio.AioRpcError as e:
                    errors.append(str(e.code()))
                    continue
                lat.append(time.perf_counter() - t)
                if expected is not None and i < c + 3 * n_clients:
                    got = np.frombuffer(reply.raw_output_contents[0], np.float32)
                    wrong[0] += not np.allclose(got, expected[k], atol=1e-5)
                i += n_clients
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in range(n_clients)))
    return lat, errors, wrong[0], time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def measured(srv, model: str, run) -> dict:
    """Run one case (``run()`` -> latencies, errors, wrong, seconds) with the server's CPU
    counters and batch statistics read around it."""
    s0, c0 = batch_stats(metrics(srv.url), model)
    cpu0 = cpu_seconds(srv.proc.pid)
    lat, errors, wrong, secs = run()
    cpu1 = cpu_seconds(srv.proc.pid)
    s1, c1 = batch_stats(metrics(srv.url), model)
    n = max(1, len(lat))
    return {"images_per_s": len(lat) / secs, "p50_ms": 1e3 * statistics.median(lat) if lat else None,
            "p99_ms": 1e3 * float(np.percentile(lat, 99)) if lat else None,
            "mean_batch": (s1 - s0) / max(1, c1 - c0), "requests": len(lat), "errors": len(errors),
            "wrong": wrong, "server_cpu_us_per_request": 1e6 * (cpu1 - cpu0) / n,
            "server_cpu_share": (cpu1 - cpu0) / secs}


def print_row(label: str, r: dict) -> None:
    print(f"{label:<36}{r['images_per_s']:>10,.0f}{r['p50_ms'] or 0:>9.2f}{r['p99_ms'] or 0:>9.2f}"
          f"{r['mean_batch']:>8.1f}{r['server_cpu_us_per_request']:>10.1f}{r['errors']:>7}{r['wrong']:>6}")


def single_image_cases(srv, prog, xte, name: str, a) -> dict:
    singles = xte[:1024, None]
    expected = prog.run(xte[:1024])
    rows = {}
    for proto in a.protocols:
        for model in ("unbatched", "batched"):
            if proto == "http":
                reqs = [request_bytes(srv.address, model, singles[i], name) for i in range(len(singles))]
                asyncio.run(http_clients(srv.address, reqs, 8, 1.0))           # warm-up

                def run(reqs=reqs):
                    return asyncio.run(http_clients(srv.address, reqs, a.clients, a.seconds, expected))
            else:
                reqs = infer_messages(model, singles, name)
                asyncio.run(grpc_clients(srv.grpc_address, reqs, 8, 1.0))

                def run(reqs=reqs):
                    return asyncio.run(grpc_clients(srv.grpc_address, reqs, a.clients, a.seconds, expected))
            r = rows[f"{proto}/{model}"] = measured(srv, model, run)
            print_row(f"{proto} single images, batching {'on' if model == 'batched' else 'off'}", r)
        ratio = rows[f"{proto}/batched"]["images_per_s"] / rows[f"{proto}/unbatched"]["images_per_s"]
        rows[f"{proto}/batching_speedup"] = ratio
        print(f"  {proto}: batching on / off = {ratio:.2f}x the images/s")
    return rows


def floor_cases(srv, a) -> dict:
    """What the protocol alone costs the server: a health request (HTTP GET
    /v2/health/live, gRPC ServerLive), which touches no model."""
    rows = {}
    live = [b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"]
    for proto in a.protocols:
        if proto == "http":
            def run():
                return asyncio.run(http_clients(srv.address, live, a.clients, a.seconds / 2))
        else:
            def run():
                return asyncio.run(grpc_clients(srv.grpc_address, [b""], a.clients, a.seconds / 2, method="ServerLive"))
        r = rows[proto] = measured(srv, "-", run)
        print_row(f"{proto} health request (the floor)", r)
    return rows


def big_request_case(srv, prog, xte, name: str, a) -> dict:
    big = [request_bytes(srv.address, "big", xte[i * 1024:(i + 1) * 1024], name) for i in range(4)]
    asyncio.run(http_clients(srv.address, big, 4, 1.0))
    expected = [prog.run(xte[i * 1024:(i + 1) * 1024]) for i in range(4)]
    r = measured(srv, "big", lambda: asyncio.run(http_clients(srv.address, big, 4, a.seconds, expected)))
    r["images_per_s"] *= 1024
    times = []
    for _ in range(30):
        t = time.perf_counter()
        prog.run(xte[:1024])
        times.append(time.perf_counter() - t)
    r["direct_images_per_s"] = 1024 / statistics.median(times)
    r["ratio"] = r["images_per_s"] / r["direct_images_per_s"]
    print_row("http 1,024-image requests, 4 clients", r)
    print(f"{'program.run(1,024 images) direct':<36}{r['direct_images_per_s']:>10,.0f}"
          f"{1e3 * statistics.median(times):>9.2f}")
    print(f"server / direct: {r['ratio']:.0%}")
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mdf", default=str(ROOT / "examples" / "mnist_softmax.mdf.json"))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--protocols", nargs="+", default=["http", "grpc"], choices=["http", "grpc"])
    ap.add_argument("--no-big", action="store_true", help="skip the 1,024-image requests")
    ap.add_argument("--json", dest="json_out", default=None)
    a = ap.parse_args()
    tune_host_allocator()     # as the gpu-mdf command does: the direct baseline on equal terms
    (_, _), (xte, _) = load_mnist()
    prog = compile(a.mdf, device="cpu")
    name = prog.primary_input.name
    out = {"mdf": a.mdf, "clients": a.clients, "seconds": a.seconds, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        for model, cfg in MODELS:
            (repo / model / "1").mkdir(parents=True)
            shutil.copy(a.mdf, repo / model / "1" / "model.mdf.json")
            (repo / model / "config.yaml").write_text(cfg)
        args = ["--no-access-log"] + (["--grpc-port", "0"] if "grpc" in a.protocols else [])
        with launched(repo, *args) as srv:
            grpc_address = getattr(srv, "grpc_address", "") or "off"
            print(f"server {srv.url} (gRPC {grpc_address}), pid {srv.proc.pid}; model {a.mdf}; "
                  f"{a.clients} clients x {a.seconds:g} s each case; {os.cpu_count()} CPUs shared with the client")
            print(f"\n{'case':<36}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'batch':>8}{'srv us/req':>10}"
                  f"{'errors':>7}{'wrong':>6}")
            out["single_images"] = single_image_cases(srv, prog, xte, name, a)
            out["floor"] = floor_cases(srv, a)
            if not a.no_big:
                out["big_requests"] = big_request_case(srv, prog, xte, name, a)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
