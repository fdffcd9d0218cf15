"""The Open Inference Protocol's gRPC form (``inference.GRPCInferenceService``: what
``tritonclient.grpc`` and the KServe SDK's gRPC client speak), on the same event loop,
models, batchers, in-flight budget and token as the REST routes.

Tensors travel as ``raw_input_contents`` / ``raw_output_contents`` (little-endian bytes,
no shared memory) or as typed ``contents``; answers always carry raw bytes. Triton's
model repository RPCs (index, load, unload) are served too. The token, when set, is the
``authorization: Bearer <token>`` metadata of every RPC but ServerLive and ServerReady.
Refusals carry the gRPC code of the REST status (400 INVALID_ARGUMENT, 404 NOT_FOUND,
503 UNAVAILABLE...) and the same one-line message.
"""

from __future__ import annotations

import asyncio
import hmac

import grpc
import numpy as np

from .. import __version__
from ..errors import GpuMdfError
from .endpoints import EXTENSIONS
from .errors import BadRequest, Unauthorized, public_message, status_of
from .proto import inference_pb2 as pb
from .protocol import DATATYPES, InferRequest, check_batch, check_shape, tensor_from_raw, tensor_from_values

SERVICE = "inference.GRPCInferenceService"
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
         409: grpc.StatusCode.ALREADY_EXISTS, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
         415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
         501: grpc.StatusCode.UNIMPLEMENTED, 503: grpc.StatusCode.UNAVAILABLE}
CONTENTS = {"UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "FP16": "fp32_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}
OPEN = ("ServerLive", "ServerReady")         # as /v2/health/*: no token needed


class Service:
    """One method per RPC; each answers from the REST endpoints' own objects."""

    def __init__(self, app, budget, token: str | None):
        self.app, self.budget, self.token = app, budget, token
        self.endpoints, self.repo, self.metrics = app.endpoints, app.endpoints.repo, app.metrics
        self.root = app.root

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.repo.loading_count() == 0)

    async def ModelReady(self, request, context):
        try:
            self.repo.get(request.name, request.version or None)
            return pb.ModelReadyResponse(ready=True)
        except GpuMdfError:
            return pb.ModelReadyResponse(ready=False)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="gpu-mdf", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        version = self.repo.get(request.name, request.version or None)
        meta = version.metadata()
        versions = [version.version] if request.version else self.repo.models[version.model].version_names()
        tensors = [[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta[k]] for k in ("inputs", "outputs")]
        return pb.ModelMetadataResponse(name=meta["name"], versions=versions, platform=meta["platform"],
                                        inputs=tensors[0], outputs=tensors[1],
                                        properties={k: str(v) for k, v in meta["parameters"].items()})

    async def ModelInfer(self, request, context):
        async def prepare(version):
            req = parse_grpc_request(request, version.input_names, version.output_names)
            return req, {name: version.program.check_input(x, version.specs[name]) for name, x in req.inputs.items()}
        version, req, outputs = await self.endpoints.serve(
            lambda: self.repo.get(request.model_name, request.model_version or None), prepare)
        return infer_reply(version.model, version.version, req, outputs)

    async def RepositoryIndex(self, request, context):
        rows = self.repo.index()
        if request.ready:
            rows = [r for r in rows if r["state"] == "READY"]
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

    async def RepositoryModelLoad(self, request, context):
        if request.parameters:
            raise BadRequest("load parameters are not supported: put the settings in the model's config.yaml")
        state = await asyncio.get_running_loop().run_in_executor(None, self.repo.load, request.model_name)
        if state.state != "READY":
            raise BadRequest(f"failed to load {request.model_name!r}: {state.reason}")
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        self.repo.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- the wrapper every RPC runs in ----------------------------------------------------- #
    def handler(self, name: str, request_type, response_type):
        method = getattr(self, name)
        counter = {"route": f"grpc/{name}"}

        async def rpc(request, context):
            try:
                if name not in OPEN:
                    self._check_token(context)
                response = await self._reserved(method, request, context) if name == "ModelInfer" \
                    else await method(request, context)
                self.metrics.inc("gpu_mdf_http_requests_total", {**counter, "code": "200"})
                return response
            except Exception as e:
                status = status_of(e)
                self.metrics.inc("gpu_mdf_http_requests_total", {**counter, "code": str(status)})
                if not isinstance(e, GpuMdfError):
                    self.app.settings.log(f"internal error in gRPC {name}: {type(e).__name__}: {e}")
                    message = f"internal error ({type(e).__name__}); the server log has the details"
                else:
                    message = public_message(e, self.root)
                await context.abort(CODES.get(status, grpc.StatusCode.INTERNAL), message)

        return grpc.unary_unary_rpc_method_handler(rpc, request_deserializer=request_type.FromString,
                                                   response_serializer=response_type.SerializeToString)

    async def _reserved(self, method, request, context):
        """ModelInfer holding its message's bytes (twice: the message and its arrays) from
        the server's in-flight budget."""
        from .http import Request
        hold = Request("POST", "", b"", {}, b"", "", False, 0, self.budget)
        hold.reserve(2 * request.ByteSize(), "the gRPC request")
        try:
            return await method(request, context)
        finally:
            hold.release()

    def _check_token(self, context) -> None:
        if self.token is None:
            return
        given = [v for k, v in context.invocation_metadata() if k == "authorization"]
        if len(given) > 1:
            raise BadRequest("the authorization metadata is given more than once")
        auth = given[0] if given else ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            raise Unauthorized("missing or wrong bearer token (authorization: Bearer <token>)")


def _parameters(params, allowed: set[str], what: str) -> None:
    bad = set(params) - allowed
    if bad:
        raise BadRequest(f"{what} parameter(s) {sorted(bad)} are not supported by this server")


def parse_grpc_request(request, model_inputs: dict[str, bool], model_outputs) -> InferRequest:
    """A ModelInferRequest as the REST parser's InferRequest (the same checks)."""
    _parameters(request.parameters, {"binary_data_output"}, "request")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs = {}
    for i, t in enumerate(request.inputs):
        if t.name not in model_inputs:
            raise BadRequest(f"unknown input {t.name[:128]!r}; the model takes {list(model_inputs)}")
        if t.name in inputs:
            raise BadRequest(f"input {t.name!r} is given twice")
        _parameters(t.parameters, {"binary_data_size"}, f"input {t.name!r}")
        shape = list(t.shape)
        count = check_shape(t.name, shape)
        if t.datatype not in DATATYPES:
            raise BadRequest(f"input {t.name!r}: datatype {t.datatype[:32]!r} is not supported "
                             f"(one of {', '.join(DATATYPES)})")
        if raw:
            inputs[t.name] = tensor_from_raw(t.name, t.datatype, shape, count, raw[i])
        else:
            values = getattr(t.contents, CONTENTS[t.datatype])
            inputs[t.name] = tensor_from_values(t.name, np.asarray(values), shape, count, t.datatype)
    check_batch(inputs, model_inputs)
    outputs = []
    for o in request.outputs:
        if o.name not in model_outputs:
            raise BadRequest(f"unknown output {o.name[:128]!r}; the model has {list(model_outputs)}")
        _parameters(o.parameters, {"binary_data"}, f"output {o.name!r}")
        outputs.append((o.name, True))
    return InferRequest(request.id or None, inputs, outputs, True)


def infer_reply(model: str, version: str, req: InferRequest, outputs: dict[str, np.ndarray]):
    from .protocol import DATATYPE_OF
    reply = pb.ModelInferResponse(model_name=model, model_version=version, id=req.id or "")
    for name, _ in req.outputs or [(n, True) for n in outputs]:
        a = np.ascontiguousarray(outputs[name])
        reply.outputs.add(name=name, datatype=DATATYPE_OF[a.dtype], shape=a.shape)
        reply.raw_output_contents.append(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    return reply


RPCS = {"ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
        "RepositoryIndex": (pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
        "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse),
        "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse)}


async def start_grpc(app, budget, host: str, port: int, token: str | None, limits):
    """A started ``grpc.aio`` server on ``host:port`` (0: any free) and its bound port."""
    service = Service(app, budget, token)
    handlers = {name: service.handler(name, *types) for name, types in RPCS.items()}
    server = grpc.aio.server(
        handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)],
        maximum_concurrent_rpcs=limits.max_connections,
        options=[("grpc.max_receive_message_length", limits.max_body),
                 ("grpc.max_send_message_length", max(limits.max_body, 64 << 20)),
                 ("grpc.max_connection_idle_ms", int(max(60.0, limits.keepalive_timeout) * 1000)),
                 ("grpc.http2.max_pings_without_data", 0), ("grpc.so_reuseport", 0)])
    bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if not bound:
        raise GpuMdfError(f"cannot listen on {host}:{port} for gRPC")
    await server.start()
    return server, bound

