"""The HTTP application: :class:`App`, the ASGI callable uvicorn serves.

Every request goes the same way: bearer token (every route but health), the body limit
(by ``Content-Length``, then while the body is read), the route from the one table
(:data:`.endpoints.ROUTES`: 404, 405, or a redirect across a trailing slash as Starlette
does), the endpoint, its error mapped to a status (:func:`.errors.status_of`), then one
counter and one JSON access-log line. Starlette supplies the responses; no router or
middleware stack of its own runs, so the inference route, first in the table, costs one
regular expression to find.
"""

from __future__ import annotations

import hmac
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import URL
from starlette.responses import JSONResponse, RedirectResponse, Response

from ..errors import GpuMdfError
from .endpoints import ROUTES, Call, Endpoints
from .errors import BadRequest, NotAllowed, NotFound, PayloadTooLarge, Unauthorized, status_of
from .metrics import Metrics
from .repository import Repository
from .routes import Router


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Settings:
    """What ``gpu-mdf serve``'s options set."""
    max_body: int = 64 << 20             # bytes, as sent and once decompressed
    token: str | None = None             # None: no token needed
    access_log: bool = True
    convert_memory: int = 4 << 30        # the conversion worker's address-space limit
    convert_seconds: int = 120           # and its CPU-time limit
    log: Callable[[str], None] = log_to_stderr


def json_error(message: str, status: int, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def check_body_size(size: int, limit: int, declared: bool = False) -> None:
    """Refuse a body of ``size`` bytes (``declared`` by Content-Length, or read so far)
    over ``limit``."""
    if size > limit:
        body = f"the body ({size:,} bytes)" if declared else "the body"
        raise PayloadTooLarge(f"{body} is over the {limit:,}-byte limit (gpu-mdf serve --max-body-mb)")


async def read_body(receive, limit: int) -> bytes | None:
    """The request body, refused as soon as it passes ``limit``; None if the client left."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        check_body_size(size, limit)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


class _Recorder:
    """ASGI ``send`` passed through, remembering the status and counting the body bytes."""
    __slots__ = ("send", "status", "bytes_out")

    def __init__(self, send):
        self.send, self.status, self.bytes_out = send, 500, 0

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.bytes_out += len(message.get("body", b""))
        await self.send(message)


class App:
    """The ASGI application: every request, from the token check to the access-log line."""

    def __init__(self, repo: Repository, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.router = Router(ROUTES, Endpoints(repo, settings, metrics))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":         # lifespan is off; there is no WebSocket route
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1000})
            return
        started = time.perf_counter()
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        route, handler, params = self.router.match(scope["path"])
        recorder = _Recorder(send)
        response = await self._answer(scope, receive, headers, route, handler, params)
        if response is not None:
            await response(scope, receive, recorder)
        self.metrics.inc("gpu_mdf_http_requests_total",
                         {"route": route.label if route else "other", "code": str(recorder.status)})
        if self.settings.access_log:
            self._log_access(scope, headers, recorder, started)

    async def _answer(self, scope, receive, headers, route, handler, params) -> Response | None:
        """The response to one request; None when the client left before its body ended."""
        path, method = scope["path"], scope["method"]
        try:
            self._check_token(path, headers)
            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    raise BadRequest(f"bad Content-Length {length!r}")
                check_body_size(int(length), self.settings.max_body, declared=True)
            if route is None:
                return self._no_route(scope)
            if method not in route.methods:
                raise NotAllowed(f"{method} is not allowed on {path}: {', '.join(route.methods)}")
            body = await read_body(receive, self.settings.max_body) if route.method == "POST" else b""
            if body is None:
                return None
            return await handler(Call(params, headers, scope["query_string"], body))
        except Exception as e:
            return self._error_response(e, path)

    def _check_token(self, path: str, headers: dict) -> None:
        token = self.settings.token
        if token is None or path.startswith("/v2/health/"):
            return
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Unauthorized("missing or wrong bearer token (Authorization: Bearer <token>)",
                               headers={"WWW-Authenticate": "Bearer"})

    def _no_route(self, scope) -> Response:
        twin = self.router.slash_twin(scope["path"])
        if twin is None:
            raise NotFound(f"no route {scope['path']}")
        return RedirectResponse(str(URL(scope={**scope, "path": twin})))

    def _error_response(self, e: Exception, path: str) -> Response:
        if not isinstance(e, GpuMdfError):      # a bug: logged with its traceback, 500 to the client
            self.settings.log(f"internal error on {path}: {''.join(traceback.format_exception(e))}")
            return json_error(f"internal error: {type(e).__name__}: {e}", 500)
        return json_error(str(e), status_of(e), getattr(e, "headers", None))

    def _log_access(self, scope, headers: dict, recorder: _Recorder, started: float) -> None:
        client = scope.get("client") or ("", 0)
        length = headers.get("content-length", "")
        self.settings.log(json.dumps({
            "ts": round(time.time(), 3), "client": f"{client[0]}:{client[1]}", "method": scope["method"],
            "path": scope["path"], "status": recorder.status, "ms": round((time.perf_counter() - started) * 1e3, 2),
            "bytes_in": int(length) if length.isdigit() else 0, "bytes_out": recorder.bytes_out},
            separators=(",", ":")))
