"""The HTTP application: KServe v2 REST routes on Starlette, served by uvicorn.

Routes (v2 = the KServe v2 / Open Inference Protocol):

    GET  /v2/health/live | /v2/health/ready               (no token needed)
    GET  /v2                                               server metadata, extensions
    GET  /v2/models/{m}[/versions/{v}]                     model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready
    GET  /v2/models/{m}[/versions/{v}]/config              Triton's model configuration
    POST /v2/models/{m}[/versions/{v}]/infer               JSON or binary tensor data
    POST /v2/repository/index                              model repository extension
    POST /v2/repository/models/{m}/load | /unload
    POST /v2/convert[?name=M&normalize=l2]                 our extension: .keras/.h5 -> MDF
    GET  /metrics                                          Prometheus
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .. import __version__
from ..engine import BatchResult
from ..engine.preprocess import nonfinite_items
from ..errors import DataError, GpuMdfError
from ..io import atomic_path, safe_join
from .batcher import Closed, QueueFull
from .metrics import Metrics
from .protocol import ProtocolError, decode_body, infer_response, parse_infer_request
from .repository import Repository, RepositoryError, Version, check_name

INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
EXTENSIONS = ["binary_tensor_data", "model_repository", "gpu_mdf_convert"]
ROUTE_LABELS = [(re.compile(p), label) for p, label in [
    (r"^/v2/health/(live|ready)$", "/v2/health/{kind}"),
    (r"^/v2/?$", "/v2"),
    (r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$", "/v2/models/{m}/infer"),
    (r"^/v2/models/[^/]+(/versions/[^/]+)?(/ready|/config)?$", "/v2/models/{m}"),
    (r"^/v2/repository/.*$", "/v2/repository"),
    (r"^/v2/convert$", "/v2/convert"),
    (r"^/metrics$", "/metrics"),
]]


def error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Settings:
    def __init__(self, max_body: int = 64 << 20, token: str | None = None, access_log: bool = True,
                 convert_memory: int = 4 << 30, convert_seconds: int = 120, log=None):
        self.max_body, self.token, self.access_log = max_body, token, access_log
        self.convert_memory, self.convert_seconds = convert_memory, convert_seconds
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))


class Guard:
    """ASGI middleware: bearer token (every route but health), the body limit by
    Content-Length, and one JSON access-log line and one counter per request."""

    def __init__(self, app, settings: Settings, metrics: Metrics, infer=None):
        self.app, self.s, self.metrics, self.infer = app, settings, metrics, infer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope.get("path", "")
        status = {"code": 500, "bytes": 0}

        async def send_wrapper(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            elif msg["type"] == "http.response.body":
                status["bytes"] += len(msg.get("body", b""))
            await send(msg)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self._refuse(path, headers)
        fast = INFER_PATH.match(path) if self.infer else None
        if refusal is not None:
            await refusal(scope, receive, send_wrapper)
        elif fast:
            await self.infer(scope, receive, send_wrapper, fast.group(1), fast.group(2), headers)
        else:
            await self.app(scope, receive, send_wrapper)
        label = next((lab for rx, lab in ROUTE_LABELS if rx.match(path)), "other")
        self.metrics.inc("gpu_mdf_http_requests_total", {"route": label, "code": str(status["code"])})
        if self.s.access_log:
            client = scope.get("client") or ("", 0)
            self.s.log(json.dumps({"ts": round(time.time(), 3), "client": f"{client[0]}:{client[1]}",
                                   "method": scope.get("method"), "path": path, "status": status["code"],
                                   "ms": round((time.perf_counter() - t0) * 1e3, 2),
                                   "bytes_in": int(headers.get("content-length") or 0),
                                   "bytes_out": status["bytes"]}, separators=(",", ":")))

    def _refuse(self, path: str, headers: dict):
        if self.s.token is not None and not path.startswith("/v2/health/"):
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), self.s.token.encode()):
                r = error("missing or wrong bearer token (Authorization: Bearer <token>)", 401)
                r.headers["WWW-Authenticate"] = "Bearer"
                return r
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return error(f"bad Content-Length {length!r}", 400)
            if int(length) > self.s.max_body:
                return error(f"the body ({int(length):,} bytes) is over the {self.s.max_body:,}-byte limit "
                             "(gpu-mdf serve --max-body-mb)", 413)
        return None


def create_app(repo: Repository, settings: Settings, metrics: Metrics) -> Starlette:
    s = settings
    convert_slots = asyncio.Semaphore(1)
    convert_waiting = {"n": 0}

    async def body_of(request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > s.max_body:
                raise ProtocolError(f"the body is over the {s.max_body:,}-byte limit (gpu-mdf serve --max-body-mb)",
                                    413)
            chunks.append(chunk)
        return decode_body(b"".join(chunks), request.headers.get("content-encoding"), s.max_body)

    def version_of(request: Request) -> Version:
        name, version = request.path_params["name"], request.path_params.get("version")
        try:
            return repo.get(name, version)
        except LookupError as e:
            raise ProtocolError(str(e).strip("'\""), 404) from None
        except RuntimeError as e:
            raise ProtocolError(str(e), 400) from None

    def handled(fn):
        async def wrapper(request: Request):
            try:
                return await fn(request)
            except ProtocolError as e:
                return error(str(e), e.status)
            except (DataError, RepositoryError) as e:
                return error(str(e), 400)
            except Exception as e:       # a bug: logged with its traceback, 500 to the client
                s.log(f"internal error on {request.url.path}: {traceback.format_exc()}")
                return error(f"internal error: {type(e).__name__}: {e}", 500)
        return wrapper

    # -- health and metadata -------------------------------------------------------- #
    async def live(request):
        return JSONResponse({"live": True})

    async def ready(request):
        bad = [m.name for m in repo.models.values() if m.state == "UNAVAILABLE"]
        if bad:
            return JSONResponse({"ready": False, "error": f"model(s) failed to load: {bad}"}, status_code=503)
        return JSONResponse({"ready": True})

    async def server_metadata(request):
        return JSONResponse({"name": "gpu-mdf", "version": __version__, "extensions": EXTENSIONS})

    @handled
    async def model_metadata(request):
        v = version_of(request)
        meta = v.metadata()
        if "version" not in request.path_params:
            meta["versions"] = sorted(repo.models[v.model].versions, key=int)
        return JSONResponse(meta)

    async def model_ready(request):
        try:
            version_of(request)
        except ProtocolError as e:
            return error(str(e), 400 if e.status != 404 else 404)
        return JSONResponse({"name": request.path_params["name"], "ready": True})

    @handled
    async def model_config(request):
        v = version_of(request)
        meta = v.metadata()
        cfg = v.config
        return JSONResponse({
            "name": v.model, "platform": meta["platform"], "backend": "gpu-mdf",
            "max_batch_size": cfg.max_batch_size,
            "input": [{"name": i["name"], "data_type": "TYPE_" + i["datatype"], "dims": i["shape"][1:]}
                      for i in meta["inputs"]],
            "output": [{"name": o["name"], "data_type": "TYPE_" + o["datatype"], "dims": o["shape"][1:]}
                       for o in meta["outputs"]],
            "dynamic_batching": ({"max_queue_delay_microseconds": int(cfg.max_queue_delay_ms * 1000)}
                                 if cfg.dynamic_batching else None)})

    # -- inference -------------------------------------------------------------------- #
    def prepare(v: Version, body: bytes, header_length):
        req = parse_infer_request(body, header_length, v.input_names, list(v.output_names))
        specs = {p.name: p for p in v.program.inputs}
        return req, {name: v.program.check_input(x, specs[name]) for name, x in req.inputs.items()}

    async def infer(name: str, version: str | None, body: bytes, headers: dict) -> Response:
        """One inference request, whole: the body is already read."""
        t0 = time.perf_counter()
        try:
            v = repo.get(name, version)
        except LookupError as e:
            return error(str(e).strip("'\""), 404)
        except RuntimeError as e:
            return error(str(e), 400)
        labels = {"model": v.model, "version": v.version}
        code = 500
        try:
            body = decode_body(body, headers.get("content-encoding"), s.max_body)
            header_length = headers.get("inference-header-content-length")
            req, feeds = await run_in_threadpool(prepare, v, body, header_length) if len(body) > 65536 \
                else prepare(v, body, header_length)
            loop = asyncio.get_running_loop()
            fut = loop.create_future()

            def resolve(out, err, stats):
                if not fut.done():
                    fut.set_result((out, err, stats))

            try:
                v.batcher.submit(feeds, lambda out, err, stats: loop.call_soon_threadsafe(resolve, out, err, stats))
            except (QueueFull, Closed) as e:
                raise ProtocolError(str(e), 503) from None
            out, err, stats = await fut
            if err is not None:
                if isinstance(err, GpuMdfError):
                    raise ProtocolError(str(err), 400)
                s.log(f"batch failed for {v.model}/{v.version}: " + "".join(traceback.format_exception(err)))
                raise ProtocolError(f"the batch failed: {type(err).__name__}: {err}", 500)
            bad = nonfinite_items(out)
            if bad is not None:
                raise ProtocolError(f"item {int(np.flatnonzero(bad)[0])}: {BatchResult.NONFINITE_REASON}", 400)
            metrics.observe("gpu_mdf_queue_seconds", labels, stats["queue_s"])
            metrics.observe("gpu_mdf_compute_seconds", labels, stats["compute_s"])
            content, header_len = infer_response(v.model, v.version, req, out)
            code = 200
        except (ProtocolError, DataError) as e:
            code = getattr(e, "status", 400)
            return error(str(e), code)
        except Exception as e:     # a bug: logged with its traceback, 500 to the client
            s.log(f"internal error on {name}/infer: {traceback.format_exc()}")
            return error(f"internal error: {type(e).__name__}: {e}", 500)
        finally:
            metrics.inc("gpu_mdf_requests_total", {**labels, "code": str(code)})
            if code != 200:
                metrics.inc("gpu_mdf_request_failures_total", labels)
            metrics.observe("gpu_mdf_request_seconds", labels, time.perf_counter() - t0)
        if header_len is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_len)})

    async def infer_asgi(scope, receive, send, name: str, version: str | None, headers: dict):
        """The inference route as plain ASGI (no router, request object or exception
        middleware on the hot path)."""
        if scope["method"] != "POST":
            return await error(f"{scope['method']} is not allowed on {scope['path']}: POST", 405)(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > s.max_body:
                return await error(f"the body is over the {s.max_body:,}-byte limit (gpu-mdf serve --max-body-mb)",
                                   413)(scope, receive, send)
            chunks.append(chunk)
            if not msg.get("more_body"):
                break
        response = await infer(name, version, b"".join(chunks), headers)
        await response(scope, receive, send)

    # -- repository extension -------------------------------------------------------- #
    async def _json_body(request) -> dict:
        raw = await body_of(request)
        if not raw.strip():
            return {}
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise ProtocolError(f"the request is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ProtocolError("the request must be a JSON object")
        return doc

    @handled
    async def repo_index(request):
        doc = await _json_body(request)
        unknown = set(doc) - {"ready"}
        if unknown:
            raise ProtocolError(f"unknown field(s) {sorted(unknown)} (supported: ready)")
        rows = await run_in_threadpool(repo.index)
        if doc.get("ready"):
            rows = [r for r in rows if r["state"] == "READY"]
        return JSONResponse(rows)

    @handled
    async def repo_load(request):
        name = check_name(request.path_params["name"])
        doc = await _json_body(request)
        if doc.get("parameters"):
            raise ProtocolError(f"load parameters {sorted(doc['parameters'])} are not supported: "
                                "put the settings in the model's config.yaml")
        state = await run_in_threadpool(repo.load, name)
        if state.state != "READY":
            return error(f"failed to load {name!r}: {state.reason}", 400)
        return JSONResponse({})

    @handled
    async def repo_unload(request):
        name = check_name(request.path_params["name"])
        await _json_body(request)
        try:
            repo.unload(name)
        except LookupError as e:
            raise ProtocolError(str(e).strip("'\""), 404) from None
        return JSONResponse({})

    # -- conversion (our extension) ------------------------------------------------------ #
    @handled
    async def convert(request: Request):
        from ..extras import hint, installed
        body = await body_of(request)
        q = dict(request.query_params)
        unknown = set(q) - {"name", "normalize"}
        if unknown:
            raise ProtocolError(f"unknown query parameter(s) {sorted(unknown)} (supported: name, normalize)")
        normalize = q.get("normalize", "l2")
        if normalize not in ("l2", "scale", "none"):
            raise ProtocolError(f"normalize {normalize!r}: one of l2, scale, none")
        name = check_name(q["name"]) if "name" in q else None
        if not installed("keras"):
            raise ProtocolError(hint("keras", "conversion on this server"), 501)
        if body[:4] == b"PK\x03\x04":
            suffix = ".keras"
        elif body[:8] == b"\x89HDF\r\n\x1a\n":
            suffix = ".h5"
        else:
            raise ProtocolError("the upload is neither a .keras archive (zip) nor an .h5 (HDF5) file", 415)
        if convert_waiting["n"] >= 4:
            raise ProtocolError("4 conversions are already waiting; retry later", 503)
        convert_waiting["n"] += 1
        try:
            async with convert_slots:
                mdf_text = await run_in_threadpool(_convert_upload, body, suffix, normalize, name or "model", s)
        finally:
            convert_waiting["n"] -= 1
        if name is None:
            return Response(mdf_text, media_type="application/json")
        version = repo.next_version(name)
        target = safe_join(repo.root, name) / version / "model.mdf.json"
        target.parent.mkdir(parents=True, exist_ok=False)
        with atomic_path(target) as tmp:
            tmp.write_bytes(mdf_text)
        state = await run_in_threadpool(repo.load, name)
        return JSONResponse({"name": name, "version": version, "state": state.state, "reason": state.reason},
                            status_code=201 if state.state == "READY" else 400)

    async def prometheus(request):
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    async def not_found(request, exc):
        code = getattr(exc, "status_code", 404)
        msg = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error(msg.get(code, getattr(exc, "detail", "error")), code)

    m = "/v2/models/{name}"
    mv = "/v2/models/{name}/versions/{version}"
    routes = [
        Route("/v2/health/live", live), Route("/v2/health/ready", ready),
        Route("/v2", server_metadata), Route("/v2/", server_metadata),
        Route(m, model_metadata), Route(mv, model_metadata),
        Route(m + "/ready", model_ready), Route(mv + "/ready", model_ready),
        Route(m + "/config", model_config), Route(mv + "/config", model_config),
        Route("/v2/repository/index", repo_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", repo_load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", repo_unload, methods=["POST"]),
        Route("/v2/convert", convert, methods=["POST"]),
        Route("/metrics", prometheus),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    return Guard(app, s, metrics, infer_asgi)


def _convert_upload(body: bytes, suffix: str, normalize: str, model_id: str, s: Settings) -> bytes:
    """Run the conversion worker on the upload; its MDF JSON, or ProtocolError 422."""
    with tempfile.TemporaryDirectory(prefix="gpu-mdf-convert-") as tmp:
        src, out = Path(tmp) / f"upload{suffix}", Path(tmp) / "model.mdf.json"
        src.write_bytes(body)
        cmd = [sys.executable, "-m", "gpu_mdf.serve.convert_worker", str(src), str(out), normalize, model_id,
               str(s.convert_memory), str(s.convert_seconds)]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        try:
            r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=s.convert_seconds + 30)
        except subprocess.TimeoutExpired:
            raise ProtocolError(f"the conversion took over {s.convert_seconds + 30} s and was stopped", 422) from None
        if r.returncode != 0 or not out.exists():
            lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
            limit = ", over its CPU or memory limit" if r.returncode < 0 else ""
            why = lines[-1] if r.returncode == 2 and lines else f"the converter stopped (exit {r.returncode}{limit})"
            if r.returncode not in (2,) and lines:
                s.log(f"conversion worker failed: {lines[-1]}")
            raise ProtocolError(f"conversion refused: {why}", 422)
        return out.read_bytes()
