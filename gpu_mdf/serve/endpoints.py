"""The server's endpoints: :data:`ROUTES`, the one route table (paths, methods, the
``/metrics`` route labels), and :class:`Endpoints`, one thin method per route.

An endpoint takes the :class:`Call` (the body already read, within the limits) and returns
a :class:`~.http.Response`, or raises: an :class:`~.errors.HTTPError` carries its status,
any other ``GpuMdfError`` is a 400 (see :mod:`.errors`). The gRPC service
(:mod:`.grpc`) calls the same inference and repository code.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote

import numpy as np
import orjson

from .. import __version__
from ..engine import BatchResult
from ..errors import GpuMdfError
from ..mdf import NORMALIZATIONS
from .batcher import Closed
from .conversion import Converter
from .errors import BadRequest, Conflict, ServerError, status_of
from .http import Request, Response
from .metrics import Metrics
from .protocol import JSON_EXPANSION, InferRequest, decode_body, infer_response, json_object
from .repository import NONFINITE, Repository, Version, check_name
from .routes import Route

if TYPE_CHECKING:
    from .app import Settings

EXTENSIONS = ["binary_tensor_data", "model_repository", "gpu_mdf_convert"]
MODEL = "/v2/models/{name}[/versions/{version}]"      # KServe v2 = the Open Inference Protocol
THREAD_FROM = 65536          # parsing a body this large would hold up the event loop: a thread does it

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
    Route("POST", "/v2/convert", "convert", "/v2/convert"),           # ours: ?name=M&normalize=l2&overwrite=true
    Route("GET", "/metrics", "prometheus", "/metrics"),                     # Prometheus text
]


@dataclass(slots=True)
class Call:
    """One request as an endpoint sees it."""
    params: dict[str, str | None]        # the route template's parameters (percent-decoded by the getters)
    headers: dict[str, str]              # names in lower case
    query: bytes
    body: bytes
    request: Request | None = None       # for reserving memory from the server's budget

    def param(self, key: str) -> str | None:
        value = self.params.get(key)
        return value if value is None or "%" not in value else unquote(value)

    def reserve(self, n: int, what: str) -> None:
        if self.request is not None:
            self.request.reserve(n, what)


def json_response(doc, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(doc), status, headers=headers)


def query_params(query: bytes, allowed: tuple[str, ...]) -> dict[str, str]:
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    found = dict(pairs)
    if len(found) != len(pairs):
        raise BadRequest("a query parameter is given twice")
    unknown = set(found) - set(allowed)
    if unknown:
        raise BadRequest(f"unknown query parameter(s) {sorted(unknown)} (supported: {', '.join(allowed)})")
    return found


def boolean(value: str, what: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no", ""):
        return False
    raise BadRequest(f"{what} {value!r}: true or false")


async def in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class Endpoints:
    """One method per route of ROUTES, named in its endpoint column."""

    def __init__(self, repo: Repository, settings: Settings, metrics: Metrics):
        self.repo, self.settings, self.metrics = repo, settings, metrics
        self.converter = repo.converter or Converter(settings, repo.root)

    # -- health and metadata -------------------------------------------------------- #
    async def live(self, call: Call) -> Response:
        return json_response({"live": True})

    async def ready(self, call: Call) -> Response:
        # no model name here: health needs no token
        waiting = self.repo.loading_count()
        if waiting:
            return json_response({"ready": False, "error": f"{waiting} model(s) still loading"}, 503)
        return json_response({"ready": True})

    async def server_metadata(self, call: Call) -> Response:
        return json_response({"name": "gpu-mdf", "version": __version__, "extensions": EXTENSIONS})

    async def model_metadata(self, call: Call) -> Response:
        version = self._version(call)
        meta = version.metadata()
        if call.params["version"] is None:
            meta["versions"] = self.repo.models[version.model].version_names()
        return json_response(meta)

    async def model_ready(self, call: Call) -> Response:
        self._version(call)
        return json_response({"name": call.param("name"), "ready": True})

    async def model_config(self, call: Call) -> Response:
        return json_response(self._version(call).triton_config())

    async def prometheus(self, call: Call) -> Response:
        return Response(self.metrics.render().encode(), content_type="text/plain; version=0.0.4")

    # -- inference -------------------------------------------------------------------- #
    async def infer(self, call: Call) -> Response:
        async def prepare(version: Version):
            body = self._body(call)
            header_length = call.headers.get("inference-header-content-length")
            if header_length is None:
                call.reserve(JSON_EXPANSION * len(body),
                             "the JSON body's arrays (binary tensor data needs no such room)")
            args = (version, body, header_length, call.param("name"), call.param("version"))
            return await in_thread(parse, *args) if len(body) > THREAD_FROM else parse(*args)
        version, request, outputs = await self.serve(lambda: self._version(call), prepare)
        content, header_length = infer_response(version.model, version.version, request, outputs)
        if header_length is None:
            return Response(content)
        return Response(content, content_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_length)})

    async def serve(self, current, prepare) -> tuple[Version, InferRequest, dict]:
        """One inference request (REST or gRPC), counted in the metrics whatever happens:
        ``prepare(version)`` parses it into ``(request, feeds)``, the version's batcher runs
        the feeds. A version that stopped taking requests because a reload replaced it
        hands the request to its successor (``current()``): a reload loses no request."""
        started, code, stats = time.perf_counter(), 500, None
        version = current()
        try:
            request, feeds = await prepare(version)
            try:
                outputs, error, stats = await version.batcher.result(feeds)
            except Closed:
                if current() is version:
                    raise
                version = current()
                outputs, error, stats = await version.batcher.result(feeds)
            if error is not None:
                raise self._batch_failure(version, error)
            bad = outputs.pop(NONFINITE, None)
            if bad is not None and bad.any():
                raise BadRequest(f"item {int(np.flatnonzero(bad)[0])}: {BatchResult.NONFINITE_REASON}")
            code = 200
            return version, request, outputs
        except Exception as e:
            code = status_of(e)
            raise
        finally:
            self.metrics.request(version.model, version.version, code, time.perf_counter() - started, stats)

    def _batch_failure(self, version: Version, error: Exception) -> Exception:
        """What to raise for a batch that failed: the user's error as it is (400), or a
        logged bug (500)."""
        if isinstance(error, GpuMdfError):
            return error
        self.settings.log(f"batch failed for {version.model}/{version.version}: "
                          + "".join(traceback.format_exception(error)))
        return ServerError(f"the batch failed ({type(error).__name__}); the server log has the details")

    # -- repository extension -------------------------------------------------------- #
    async def repository_index(self, call: Call) -> Response:
        doc = self._json(call)
        unknown = set(doc) - {"ready"}
        if unknown:
            raise BadRequest(f"unknown field(s) {sorted(unknown)} (supported: ready)")
        if not isinstance(doc.get("ready", False), bool):
            raise BadRequest("ready must be true or false")
        rows = await in_thread(self.repo.index)
        if doc.get("ready"):
            rows = [row for row in rows if row["state"] == "READY"]
        return json_response(rows)

    async def load_model(self, call: Call) -> Response:
        name = check_name(call.param("name"))
        doc = self._json(call)
        unknown = set(doc) - {"parameters"}
        if unknown:
            raise BadRequest(f"unknown field(s) {sorted(unknown)} (supported: parameters)")
        parameters = doc.get("parameters")
        if parameters:
            raise BadRequest("load parameters are not supported: put the settings in the model's config.yaml")
        state = await in_thread(self.repo.load, name)
        if state.state != "READY":
            raise BadRequest(f"failed to load {name!r}: {state.reason}")
        return json_response({})

    async def unload_model(self, call: Call) -> Response:
        name = check_name(call.param("name"))
        doc = self._json(call)
        if set(doc) - {"parameters"}:
            raise BadRequest(f"unknown field(s) {sorted(set(doc) - {'parameters'})} (supported: parameters)")
        self.repo.unload(name)
        return json_response({})

    # -- conversion (our extension) ------------------------------------------------------ #
    async def convert(self, call: Call) -> Response:
        upload = self._body(call)
        query = query_params(call.query, ("name", "normalize", "overwrite"))
        normalize = query.get("normalize")
        if normalize is not None and normalize not in NORMALIZATIONS:
            raise BadRequest(f"normalize {normalize!r}: one of {', '.join(NORMALIZATIONS)}")
        name = check_name(query["name"]) if "name" in query else None
        overwrite = boolean(query.get("overwrite", "false"), "overwrite")
        if name is not None and not overwrite and self.repo.exists(name):
            raise Conflict(f"model {name!r} exists: add overwrite=true to make the upload its next version")
        mdf = await self.converter.convert(upload, normalize, name or "model")
        if name is None:
            return Response(mdf)
        version, state = await in_thread(self.repo.add, name, mdf)
        return json_response({"name": name, "version": version, "state": state.state, "reason": state.reason},
                             201 if state.state == "READY" else 400)

    # -- helpers ---------------------------------------------------------------------- #
    def _version(self, call: Call) -> Version:
        return self.repo.get(call.param("name"), call.param("version"))

    def _body(self, call: Call) -> bytes:
        """The body with its Content-Encoding undone (within the same limit and the budget)."""
        encoding = call.headers.get("content-encoding")
        if encoding is None:
            return call.body
        return decode_body(call.body, encoding, self.settings.max_body, call.reserve)

    def _json(self, call: Call) -> dict:
        """The body's JSON object; an empty body is an empty object."""
        body = self._body(call)
        return json_object(body) if bytes(body[:64]).strip() or len(body) > 64 else {}


def parse(version: Version, body, header_length: str | None, name: str | None = None,
          version_name: str | None = None) -> tuple[InferRequest, dict]:
    """The request and its feeds, by input name, checked against the program's inputs."""
    program = version.program
    request = version.headers.parse(body, header_length, version.input_names, version.output_names,
                                    (name, version_name))
    specs = version.specs
    return request, {name: program.check_input(x, specs[name]) for name, x in request.inputs.items()}
