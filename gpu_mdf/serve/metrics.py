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
    gpu_mdf_http_requests_total{route,code}        every route
"""

from __future__ import annotations

import collections
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
    "gpu_mdf_http_requests_total": ("counter", "HTTP requests by route and status"),
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

    def inc(self, name: str, labels: dict, by: float = 1.0) -> None:
        with self._lock:
            self._counters[(name, tuple(labels.items()))] += by

    def observe(self, name: str, labels: dict, value: float, buckets=TIME_BUCKETS) -> None:
        key = (name, tuple(labels.items()))
        with self._lock:
            h = self._hist.get(key)
            if h is None:
                h = self._hist[key] = [buckets, [0] * len(buckets), 0.0, 0]
            for i, b in enumerate(buckets):
                if value <= b:
                    h[1][i] += 1
            h[2] += value
            h[3] += 1

    def request(self, model: str, version: str, code: int, seconds: float) -> None:
        """One inference request answered with HTTP status ``code`` after ``seconds``."""
        lab = {"model": model, "version": version}
        self.inc("gpu_mdf_requests_total", {**lab, "code": str(code)})
        if code != 200:
            self.inc("gpu_mdf_request_failures_total", lab)
        self.observe("gpu_mdf_request_seconds", lab, seconds)

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
                for b, c in zip(buckets, counts):
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
