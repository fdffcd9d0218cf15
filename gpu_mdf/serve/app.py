"""The HTTP application: :class:`App`, whose ``handle`` turns one request (read, within
the limits, by :mod:`.http`) into one response.

Every request goes the same way: headers that must come once checked, the bearer token
(every route but health), the route from the one table (:data:`.endpoints.ROUTES`: 404,
405 with ``Allow``, or a redirect across a trailing slash), the endpoint, its error
mapped to a status (:func:`.errors.status_of`) with a one-line message that names no
server path, then one counter and one JSON access-log line. The inference route, first in
the table, costs one regular expression to find.
"""

from __future__ import annotations

import hmac
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from ..errors import GpuMdfError
from .endpoints import ROUTES, Call, Endpoints
from .errors import BadRequest, NotAllowed, NotFound, Unauthorized, public_message, status_of
from .http import Limits, Request, Response
from .metrics import Metrics
from .repository import Repository
from .routes import Router


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Settings:
    """What ``gpu-mdf serve``'s options set."""
    limits: Limits = field(default_factory=Limits)
    token: str | None = None             # None: no token needed
    access_log: bool = True
    convert_memory: int = 4 << 30        # the conversion worker's address-space limit
    convert_seconds: int = 120           # its CPU-time limit
    convert_disk: int = 1 << 30          # its files' limit (RLIMIT_FSIZE and its own folder's quota)
    cache_bytes: int = 256 << 20         # converted uploads kept by content hash
    log: Callable[[str], None] = log_to_stderr

    @property
    def max_body(self) -> int:
        return self.limits.max_body


def json_error(message: str, status: int, headers: dict | None = None) -> Response:
    return Response(orjson.dumps({"error": message}), status, headers=headers or None)


class App:
    """Every request, from the token check to the access-log line."""

    def __init__(self, repo: Repository, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.endpoints = Endpoints(repo, settings, metrics)
        self.router = Router(ROUTES, self.endpoints)
        self.root = str(repo.root.resolve())

    async def handle(self, req: Request) -> Response:
        started = time.perf_counter()
        route, handler, params = self.router.match(req.path)
        try:
            if ":repeated" in req.headers:
                raise BadRequest(f"the {req.headers[':repeated']} header is given more than once")
            self._check_token(req)
            if route is None:
                response = self._no_route(req)
            elif req.method not in route.methods:
                raise NotAllowed(f"{req.method} is not allowed on {req.path}: {', '.join(route.methods)}",
                                 headers={"Allow": ", ".join(route.methods)})
            else:
                response = await handler(Call(params, req.headers, req.query, req.body, req))
        except Exception as e:
            response = self._error_response(e, req.path)
        self.metrics.count_http(route.label if route else "other", response.status)
        if self.settings.access_log:
            self._log_access(req, response, started)
        return response

    def count_refusal(self, status: int) -> None:
        """A request refused while it was read (timeout, size, budget): counted too."""
        self.metrics.count_http("other", status)

    def _check_token(self, req: Request) -> None:
        token = self.settings.token
        if token is None or req.path.startswith("/v2/health/"):
            return
        auth = req.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Unauthorized("missing or wrong bearer token (Authorization: Bearer <token>)",
                               headers={"WWW-Authenticate": "Bearer"})

    def _no_route(self, req: Request) -> Response:
        twin = self.router.slash_twin(req.path)
        if twin is None:
            raise NotFound("no such route")
        query = req.query.decode("latin-1")
        return Response(b"", 307, headers={"Location": twin + (f"?{query}" if query else "")})

    def _error_response(self, e: Exception, path: str) -> Response:
        if not isinstance(e, GpuMdfError):      # a bug: logged with its traceback, 500 to the client
            self.settings.log(f"internal error on {path}: {''.join(traceback.format_exception(e))}")
            return json_error(f"internal error ({type(e).__name__}); the server log has the details", 500)
        return json_error(public_message(e, self.root), status_of(e), getattr(e, "headers", None))

    def _log_access(self, req: Request, response: Response, started: float) -> None:
        self.settings.log(orjson.dumps({
            "ts": round(time.time(), 3), "client": req.client, "method": req.method, "path": req.path,
            "status": response.status, "ms": round((time.perf_counter() - started) * 1e3, 2),
            "bytes_in": len(req.body), "bytes_out": len(response.body)}).decode())
