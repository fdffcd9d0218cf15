"""Prometheus metrics for the server, in the text exposition format (no client library:
counters, histograms and a few gauges, thread-safe).

    gpu_mdf_requests_total{model,version,code}     inference requests by HTTP status
    gpu_mdf_request_failures_total{model,version}  requests that got no result
    gpu_mdf_items_total{model,version}             images (items) inferred
    gpu_mdf_items_per_second{model,version}        over the last 10 s
    gpu_mdf_queue_seconds / gpu_mdf_compute_seconds / gpu_mdf_request_seconds   histograms
    gpu_mdf_batch_items / gpu_mdf_batch_requests   histograms of the device batches
    gpu_mdf_queue_depth{model,version}             requests waiting now
    gpu_mdf_device_memory_bytes{device,kind}       used/free on the GPU (CuPy); RSS on the CPU
    gpu_mdf_http_requests_total{route,code}        every route (gRPC calls as route grpc/<RPC>)
    gpu_mdf_inflight_bytes, gpu_mdf_connections    against --max-inflight-mb and --max-connections
    gpu_mdf_refused_total{reason}                  connections, memory, timeout
"""

from __future__ import annotations

import bisect
import collections
import itertools
import threading
import time

TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
HELP = {
    "gpu_mdf_requests_total": ("counter", "Inference requests by model, version and HTTP status"),
    "gpu_mdf_request_failures_total": ("counter", "Inference requests that got no result"),
    "gpu_mdf_items_total": ("counter", "Items (images) inferred"),
    "gpu_mdf_items_per_second": ("gauge", "Items inferred per second over the last 10 s"),
    "gpu_mdf_queue_seconds": ("histogram", "Time a request waited for its batch"),
    "gpu_mdf_compute_seconds": ("histogram", "Time of the device batch a request ran in"),
    "gpu_mdf_request_seconds": ("histogram", "Inference request time in the server, parse to response"),
    "gpu_mdf_batch_items": ("histogram", "Items per device batch"),
    "gpu_mdf_batch_requests": ("histogram", "Requests per device batch"),
    "gpu_mdf_queue_depth": ("gauge", "Requests waiting for a batch"),
    "gpu_mdf_device_memory_bytes": ("gauge", "Device memory: GPU used/free (CuPy), or the process RSS on the CPU"),
    "gpu_mdf_http_requests_total": ("counter", "HTTP requests (and gRPC calls, route grpc/...) by route and status"),
    "gpu_mdf_conversions_total": ("counter", "Model files converted, answered from the cache, or refused"),
    "gpu_mdf_inflight_bytes": ("gauge", "Request bytes held now against --max-inflight-mb"),
    "gpu_mdf_connections": ("gauge", "Open HTTP connections"),
    "gpu_mdf_refused_total": ("counter", "Connections or requests refused for connections, memory or time"),
}


def _labels(d: dict) -> str:
    if not d:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in d.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(d, esc)) + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[tuple, float] = collections.defaultdict(float)
        self._hist: dict[tuple, list] = {}
        self._recent: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
        self.gauges = []          # callables returning [(name, labels dict, value)]
        self._http_keys: dict = {}

    def inc(self, name: str, labels: dict, by: float = 1.0) -> None:
        with self._lock:
            self._counters[(name, tuple(labels.items()))] += by

    def count_http(self, route: str, code: int) -> None:
        """gpu_mdf_http_requests_total{route, code} + 1 (the per-request counter, kept cheap)."""
        key = self._http_keys.get((route, code))
        if key is None:
            key = self._http_keys[(route, code)] = ("gpu_mdf_http_requests_total",
                                                    (("route", route), ("code", str(code))))
        with self._lock:
            self._counters[key] += 1

    def observe(self, name: str, labels: dict, value: float, buckets=TIME_BUCKETS) -> None:
        """One value into a histogram: counted in its own bucket here, cumulated by render."""
        with self._lock:
            self._observe((name, tuple(labels.items())), value, buckets)

    def _observe(self, key: tuple, value: float, buckets) -> None:
        h = self._hist.get(key)
        if h is None:
            h = self._hist[key] = [buckets, [0] * (len(buckets) + 1), 0.0, 0]
        h[1][bisect.bisect_left(buckets, value)] += 1
        h[2] += value
        h[3] += 1

    def request(self, model: str, version: str, code: int, seconds: float, stats: dict | None = None) -> None:
        """One inference request answered with HTTP status ``code`` after ``seconds``; its
        queue and compute time (``stats``) when it ran. One lock for all of it."""
        lab = (("model", model), ("version", version))
        rows = [("gpu_mdf_request_seconds", seconds)]
        if stats is not None:
            rows += [("gpu_mdf_queue_seconds", stats["queue_s"]), ("gpu_mdf_compute_seconds", stats["compute_s"])]
        with self._lock:
            self._counters[("gpu_mdf_requests_total", (*lab, ("code", str(code))))] += 1
            if code != 200:
                self._counters[("gpu_mdf_request_failures_total", lab)] += 1
            for name, value in rows:
                self._observe((name, lab), value, TIME_BUCKETS)

    def batch(self, model: str, version: str, items: int, requests: int, seconds: float) -> None:
        lab = {"model": model, "version": version}
        self.observe("gpu_mdf_batch_items", lab, items, SIZE_BUCKETS)
        self.observe("gpu_mdf_batch_requests", lab, requests, SIZE_BUCKETS)
        self.inc("gpu_mdf_items_total", lab, items)
        now = time.monotonic()
        with self._lock:
            q = self._recent[(model, version)]
            q.append((now, items))
            while q and q[0][0] < now - 10:
                q.popleft()

    def render(self) -> str:
        rows: dict[str, list[str]] = collections.defaultdict(list)
        now = time.monotonic()
        with self._lock:
            for (name, labels), v in sorted(self._counters.items()):
                rows[name].append(f"{name}{_labels(dict(labels))} {v:g}")
            for (name, labels), (buckets, counts, total, n) in sorted(self._hist.items(), key=lambda kv: kv[0]):
                lab = dict(labels)
                for b, c in zip(buckets, itertools.accumulate(counts)):
                    rows[name].append(f"{name}_bucket{_labels({**lab, 'le': f'{b:g}'})} {c}")
                rows[name].append(f"{name}_bucket{_labels({**lab, 'le': '+Inf'})} {n}")
                rows[name].append(f"{name}_sum{_labels(lab)} {total:.9g}")
                rows[name].append(f"{name}_count{_labels(lab)} {n}")
            for (model, version), q in self._recent.items():
                while q and q[0][0] < now - 10:
                    q.popleft()
                rate = sum(i for _, i in q) / 10.0
                rows["gpu_mdf_items_per_second"].append(
                    f"gpu_mdf_items_per_second{_labels({'model': model, 'version': version})} {rate:g}")
        for g in self.gauges:
            for name, labels, value in g():
                rows[name].append(f"{name}{_labels(labels)} {value:g}")
        out = []
        for name in sorted(rows):
            kind, text = HELP.get(name, ("untyped", name))
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *rows[name]]
        return "\n".join(out) + "\n"
