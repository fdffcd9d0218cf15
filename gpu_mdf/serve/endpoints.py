"""The server's endpoints: :data:`ROUTES`, the one route table (paths, methods, the
``/metrics`` route labels), and :class:`Endpoints`, one thin method per route.

An endpoint takes the :class:`Call` (the body already read, within the limit) and returns
a response, or raises: an :class:`~.errors.HTTPError` carries its status, any other
``GpuMdfError`` is a 400 (see :mod:`.errors`).
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.responses import JSONResponse, PlainTextResponse, Response

from .. import __version__
from ..engine import BatchResult
from ..engine.preprocess import nonfinite_items
from ..errors import GpuMdfError
from ..mdf import NORMALIZATIONS
from .conversion import Converter
from .errors import BadRequest, ServerError, status_of
from .metrics import Metrics
from .protocol import decode_body, infer_response, json_object, parse_infer_request
from .repository import Repository, Version, check_name
from .routes import Route

if TYPE_CHECKING:
    from .app import Settings

EXTENSIONS = ["binary_tensor_data", "model_repository", "gpu_mdf_convert"]
MODEL = "/v2/models/{name}[/versions/{version}]"      # KServe v2 = the Open Inference Protocol

ROUTES = [   # method, path template, Endpoints method, /metrics route label; infer first (the hot path)
    Route("POST", MODEL + "/infer", "infer", "/v2/models/{m}/infer"),        # JSON or binary tensor data
    Route("GET", "/v2/health/live", "live", "/v2/health/{kind}"),           # health: no token needed
    Route("GET", "/v2/health/ready", "ready", "/v2/health/{kind}"),
    Route("GET", "/v2[/]", "server_metadata", "/v2"),                       # name, version, extensions
    Route("GET", MODEL, "model_metadata", "/v2/models/{m}"),
    Route("GET", MODEL + "/ready", "model_ready", "/v2/models/{m}"),
    Route("GET", MODEL + "/config", "model_config", "/v2/models/{m}"),     # Triton's model configuration
    Route("POST", "/v2/repository/index", "repository_index", "/v2/repository"),  # model repository extension
    Route("POST", "/v2/repository/models/{name}/load", "load_model", "/v2/repository"),
    Route("POST", "/v2/repository/models/{name}/unload", "unload_model", "/v2/repository"),
    Route("POST", "/v2/convert", "convert", "/v2/convert"),                 # ours: ?name=M&normalize=l2
    Route("GET", "/metrics", "prometheus", "/metrics"),                     # Prometheus text
]


@dataclass(slots=True)
class Call:
    """One request as an endpoint sees it."""
    params: dict[str, str | None]        # the route template's parameters
    headers: dict[str, str]              # names in lower case
    query: bytes
    body: bytes


class Endpoints:
    """One method per route of ROUTES, named in its endpoint column."""

    def __init__(self, repo: Repository, settings: Settings, metrics: Metrics):
        self.repo, self.settings, self.metrics = repo, settings, metrics
        self.converter = Converter(settings.convert_memory, settings.convert_seconds, settings.log)

    # -- health and metadata -------------------------------------------------------- #
    async def live(self, call: Call) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, call: Call) -> Response:
        failed = [model.name for model in self.repo.models.values() if model.state == "UNAVAILABLE"]
        if failed:
            return JSONResponse({"ready": False, "error": f"model(s) failed to load: {failed}"}, status_code=503)
        return JSONResponse({"ready": True})

    async def server_metadata(self, call: Call) -> Response:
        return JSONResponse({"name": "gpu-mdf", "version": __version__, "extensions": EXTENSIONS})

    async def model_metadata(self, call: Call) -> Response:
        version = self._version(call)
        meta = version.metadata()
        if call.params["version"] is None:
            meta["versions"] = self.repo.models[version.model].version_names()
        return JSONResponse(meta)

    async def model_ready(self, call: Call) -> Response:
        self._version(call)
        return JSONResponse({"name": call.params["name"], "ready": True})

    async def model_config(self, call: Call) -> Response:
        return JSONResponse(self._version(call).triton_config())

    async def prometheus(self, call: Call) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    # -- inference -------------------------------------------------------------------- #
    async def infer(self, call: Call) -> Response:
        started = time.perf_counter()
        version = self._version(call)
        code = 500
        try:
            response = await self._infer(version, call)
            code = 200
            return response
        except Exception as e:
            code = status_of(e)
            raise
        finally:
            self.metrics.request(version.model, version.version, code, time.perf_counter() - started)

    async def _infer(self, version: Version, call: Call) -> Response:
        body = self._body(call)
        header_length = call.headers.get("inference-header-content-length")
        if len(body) > 65536:         # parsing a large body would hold up the event loop
            request, feeds = await run_in_threadpool(_parse, version, body, header_length)
        else:
            request, feeds = _parse(version, body, header_length)
        outputs, error, stats = await version.batcher.result(feeds)
        if error is not None:
            raise self._batch_failure(version, error)
        bad = nonfinite_items(outputs)
        if bad is not None:
            raise BadRequest(f"item {int(np.flatnonzero(bad)[0])}: {BatchResult.NONFINITE_REASON}")
        labels = {"model": version.model, "version": version.version}
        self.metrics.observe("gpu_mdf_queue_seconds", labels, stats["queue_s"])
        self.metrics.observe("gpu_mdf_compute_seconds", labels, stats["compute_s"])
        content, header_length = infer_response(version.model, version.version, request, outputs)
        if header_length is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_length)})

    def _batch_failure(self, version: Version, error: Exception) -> Exception:
        """What to raise for a batch that failed: the user's error as it is (400), or a
        logged bug (500)."""
        if isinstance(error, GpuMdfError):
            return error
        self.settings.log(f"batch failed for {version.model}/{version.version}: "
                          + "".join(traceback.format_exception(error)))
        return ServerError(f"the batch failed: {type(error).__name__}: {error}")

    # -- repository extension -------------------------------------------------------- #
    async def repository_index(self, call: Call) -> Response:
        doc = self._json(call)
        unknown = set(doc) - {"ready"}
        if unknown:
            raise BadRequest(f"unknown field(s) {sorted(unknown)} (supported: ready)")
        rows = await run_in_threadpool(self.repo.index)
        if doc.get("ready"):
            rows = [row for row in rows if row["state"] == "READY"]
        return JSONResponse(rows)

    async def load_model(self, call: Call) -> Response:
        name = check_name(call.params["name"])
        parameters = self._json(call).get("parameters")
        if parameters:
            raise BadRequest(f"load parameters {sorted(parameters)} are not supported: "
                             "put the settings in the model's config.yaml")
        state = await run_in_threadpool(self.repo.load, name)
        if state.state != "READY":
            raise BadRequest(f"failed to load {name!r}: {state.reason}")
        return JSONResponse({})

    async def unload_model(self, call: Call) -> Response:
        name = check_name(call.params["name"])
        self._json(call)
        self.repo.unload(name)
        return JSONResponse({})

    # -- conversion (our extension) ------------------------------------------------------ #
    async def convert(self, call: Call) -> Response:
        upload = self._body(call)
        query = dict(QueryParams(call.query))
        unknown = set(query) - {"name", "normalize"}
        if unknown:
            raise BadRequest(f"unknown query parameter(s) {sorted(unknown)} (supported: name, normalize)")
        normalize = query.get("normalize", "l2")
        if normalize not in NORMALIZATIONS:
            raise BadRequest(f"normalize {normalize!r}: one of {', '.join(NORMALIZATIONS)}")
        name = check_name(query["name"]) if "name" in query else None
        mdf = await self.converter.convert(upload, normalize, name or "model")
        if name is None:
            return Response(mdf, media_type="application/json")
        version, state = await run_in_threadpool(self.repo.add, name, mdf)
        return JSONResponse({"name": name, "version": version, "state": state.state, "reason": state.reason},
                            status_code=201 if state.state == "READY" else 400)

    # -- helpers ---------------------------------------------------------------------- #
    def _version(self, call: Call) -> Version:
        return self.repo.get(call.params["name"], call.params["version"])

    def _body(self, call: Call) -> bytes:
        """The body with its Content-Encoding undone (within the same limit)."""
        return decode_body(call.body, call.headers.get("content-encoding"), self.settings.max_body)

    def _json(self, call: Call) -> dict:
        """The body's JSON object; an empty body is an empty object."""
        body = self._body(call)
        return json_object(body) if body.strip() else {}


def _parse(version: Version, body: bytes, header_length: str | None):
    """The request and its feeds, by input name, checked against the program's inputs."""
    program = version.program
    request = parse_infer_request(body, header_length, version.input_names, list(version.output_names))
    specs = {spec.name: spec for spec in program.inputs}
    return request, {name: program.check_input(x, specs[name]) for name, x in request.inputs.items()}
