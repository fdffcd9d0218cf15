"""HTTP/1.1 for ``gpu-mdf serve``: an asyncio protocol on httptools' C parser, with every
resource a client can hold bounded.

- **Time**: a request's headers must arrive within ``header_timeout`` seconds of its
  first byte (or of the connection), its body within ``body_timeout`` of its headers, and
  an idle keep-alive connection is closed after ``keepalive_timeout``. One sweep a
  quarter-second checks every connection's deadline, so a request pays no timer.
- **Connections**: past ``max_connections`` a new one gets 503 with ``Retry-After`` and
  is closed.
- **Memory**: a body's bytes are reserved from the server-wide :class:`Budget` before
  they are read (by ``Content-Length``, or chunk by chunk when chunked); past it, 503 with
  ``Retry-After``. A body is read into one buffer allocated at its final size (an
  anonymous ``mmap`` past 1 MiB, returned to the system when freed), which the tensors
  then view without a copy. Endpoints reserve what they expand a body into (inflating,
  JSON) from the same budget.
- One request per connection at a time (pipelined requests wait their turn, reading
  paused while one waits), ``Expect: 100-continue`` answered once the body is accepted, HEAD, HTTP/1.0.

The application is any object with ``async handle(request) -> Response``.
"""

from __future__ import annotations

import asyncio
import collections
import mmap
from dataclasses import dataclass
from http import HTTPStatus

import httptools

from .errors import HTTPError, PayloadTooLarge, Unavailable

MMAP_FROM = 1 << 20
MAX_URL = 8 << 10
MAX_HEADERS = 100
SWEEP_SECONDS = 0.25
# header names a request may carry once: a second one would be read one way here and
# another way by a proxy in front (and the last Authorization would win)
SINGLE = frozenset({b"authorization", b"content-length", b"content-encoding", b"content-type",
                    b"inference-header-content-length", b"transfer-encoding", b"host", b"expect"})
REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


@dataclass
class Limits:
    """What ``gpu-mdf serve``'s resource options set (seconds, bytes, counts)."""
    max_body: int = 64 << 20             # one request body, as sent and once decompressed
    max_header: int = 64 << 10           # request line and headers together
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 5.0
    max_connections: int = 1024
    inflight: int = 1 << 30              # bytes held by requests in flight, server-wide


class Budget:
    """Bytes held by the requests in flight, server-wide (used on the event loop only).
    ``on_idle`` runs when the budget empties after more than ``idle_after`` bytes were
    held: the server gives freed memory back to the system then."""

    def __init__(self, limit: int, on_idle=None, idle_after: int = 64 << 20):
        self.limit, self.used, self.on_idle, self.idle_after = limit, 0, on_idle, idle_after
        self._high = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        self._high = max(self._high, self.used)
        return True

    def give(self, n: int) -> None:
        self.used -= n
        if self.used == 0 and self._high > self.idle_after:
            self._high = 0
            if self.on_idle:
                self.on_idle()


class Request:
    """One request as read: ``body`` is bytes-like (a view of the buffer read into)."""
    __slots__ = ("method", "path", "query", "headers", "body", "client", "keep_alive", "reserved", "_budget")

    def __init__(self, method, path, query, headers, body, client, keep_alive, reserved, budget):
        self.method, self.path, self.query, self.headers = method, path, query, headers
        self.body, self.client, self.keep_alive = body, client, keep_alive
        self.reserved, self._budget = reserved, budget

    def reserve(self, n: int, what: str) -> None:
        """Hold ``n`` more bytes of the server's budget until the request ends: 413 when
        no budget could ever hold it, 503 while the server is busy."""
        if n > self._budget.limit:
            raise PayloadTooLarge(f"{what} would take {n:,} bytes, over the server's in-flight limit of "
                                  f"{self._budget.limit:,} (gpu-mdf serve --max-inflight-mb)")
        if not self._budget.take(n):
            raise over_budget(what)
        self.reserved += n

    def release(self) -> None:
        self._budget.give(self.reserved)
        self.reserved = 0


def over_budget(what: str) -> Unavailable:
    return Unavailable(f"the server holds its most request bytes in flight; {what} must wait: retry later",
                       headers={"Retry-After": "1"})


_STARTS: dict[tuple[int, str], bytes] = {}     # status line and content type, by both


class Response:
    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, body: bytes = b"", status: int = 200, content_type: str = "application/json",
                 headers: dict[str, str] | None = None):
        self.body, self.status, self.content_type, self.headers = body, status, content_type, headers

    def head(self, keep_alive: bool) -> bytes:
        start = _STARTS.get((self.status, self.content_type))
        if start is None:
            start = _STARTS[(self.status, self.content_type)] = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\n" % (
                self.status, REASONS.get(self.status, b""), self.content_type.encode())
        if not self.headers and keep_alive:
            return b"%scontent-length: %d\r\n\r\n" % (start, len(self.body))
        lines = [start, b"content-length: %d\r\n" % len(self.body)]
        if self.headers:
            lines += [f"{k}: {v}\r\n".encode("latin-1") for k, v in self.headers.items()]
        if not keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)


def error_bytes(status: int, message: str, headers: dict | None = None) -> bytes:
    import orjson
    r = Response(orjson.dumps({"error": message}), status, headers=headers)
    return r.head(keep_alive=False) + r.body


class _Refused(Exception):
    """Raised in a parser callback: answer with this error and close."""

    def __init__(self, error: HTTPError):
        self.error = error


IDLE, HEADERS, BODY, BUSY = range(4)


class Connection(asyncio.Protocol):
    """One client connection: parse, bound, hand each request to the application, answer."""

    def __init__(self, server: HTTPServer):
        self.server, self.limits, self.budget = server, server.limits, server.budget
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.client = ""
        self.state, self.deadline = IDLE, 0.0
        self.pending: collections.deque[Request] = collections.deque()
        self.busy = self.paused = False
        self.closed = False
        self._writable = None
        self._reset()

    def _reset(self):
        self.url, self.headers, self.header_bytes, self.repeated = b"", [], 0, None
        self.buffer, self.view, self.filled, self.fixed, self.reserved = None, None, 0, False, 0

    # -- asyncio ----------------------------------------------------------------------- #
    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        if len(self.server.connections) >= self.limits.max_connections:
            self.server.refused += 1
            transport.write(error_bytes(503, f"the server holds its most connections "
                                        f"({self.limits.max_connections}); retry later", {"Retry-After": "1"}))
            self.closed = True
            transport.close()
            return
        self.server.connections.add(self)
        self._expect(HEADERS, self.limits.header_timeout)

    def connection_lost(self, exc):
        self.closed = True
        self.server.connections.discard(self)
        self._drop_body()
        for req in self.pending:
            req.release()
        self.pending.clear()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self):
        self._writable = self.server.loop.create_future()

    def resume_writing(self):
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            refused = e.__context__ if isinstance(e.__context__, _Refused) else None
            if refused is None:
                raise
            self._fail(refused.error)
        except httptools.HttpParserUpgrade:
            self._fail(HTTPError("protocol upgrades are not supported (HTTP/1.1 only)", status=400))
        except httptools.HttpParserError as e:
            self._fail(HTTPError(f"malformed HTTP request ({str(e).split(':')[0]})", status=400))

    def timed_out(self, now: float) -> None:
        """Called by the sweep: close a connection past its deadline (408 mid-request)."""
        if self.state == IDLE or (self.state == HEADERS and not self.url and not self.headers):
            self.closed = True
            self.transport.close()             # idle, or a connection that never said anything
        elif self.state in (HEADERS, BODY):
            what = "headers" if self.state == HEADERS else "body"
            limit = self.limits.header_timeout if self.state == HEADERS else self.limits.body_timeout
            self.server.timeouts += 1
            self._fail(HTTPError(f"the request's {what} did not arrive within {limit:g} s", status=408))

    # -- httptools callbacks -------------------------------------------------------------- #
    def on_message_begin(self):
        if self.state == IDLE:
            self._expect(HEADERS, self.limits.header_timeout)

    def on_url(self, url: bytes):
        self.url += url
        if len(self.url) > MAX_URL:
            raise _Refused(HTTPError(f"the URL is over {MAX_URL:,} bytes", status=414))

    def on_header(self, name: bytes, value: bytes):
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.limits.max_header or len(self.headers) >= MAX_HEADERS:
            raise _Refused(HTTPError(f"the headers are over {self.limits.max_header:,} bytes or "
                                     f"{MAX_HEADERS} lines", status=431))
        self.headers.append((name.lower(), value))

    def on_headers_complete(self):
        headers = {}
        for name, value in self.headers:
            if name in headers and name in SINGLE:
                self.repeated = name.decode("latin-1")
            headers[name] = value
        self.headers = headers
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                raise _Refused(HTTPError(f"bad Content-Length {length[:40]!r}", status=400))
            size = int(length)
            if size > self.limits.max_body:
                raise _Refused(PayloadTooLarge(f"the body ({size:,} bytes) is over the {self.limits.max_body:,}"
                                               "-byte limit (gpu-mdf serve --max-body-mb)"))
            self._hold(size)
            self.buffer = mmap.mmap(-1, size) if size >= MMAP_FROM else bytearray(size)
            self.fixed = True
        else:
            self.buffer = bytearray()
        if headers.get(b"expect", b"").lower() == b"100-continue" and (length is None or int(length)):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._expect(BODY, self.limits.body_timeout)

    def on_body(self, chunk: bytes):
        n = len(chunk)
        if self.fixed:
            self.buffer[self.filled:self.filled + n] = chunk
        else:
            if len(self.buffer) + n > self.limits.max_body:
                raise _Refused(PayloadTooLarge(f"the body is over the {self.limits.max_body:,}-byte limit "
                                               "(gpu-mdf serve --max-body-mb)"))
            self._hold(n)
            self.buffer += chunk
        self.filled += n

    def on_message_complete(self):
        if b"?" in self.url or b"#" in self.url or not self.url.startswith(b"/"):
            target = httptools.parse_url(self.url)
            path, query = target.path.decode("latin-1"), target.query or b""
        else:
            path, query = self.url.decode("latin-1"), b""
        buffer = self.buffer
        body = b"" if buffer is None else buffer if type(buffer) is bytearray else memoryview(buffer)[:self.filled]
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in self.headers.items()}
        if self.repeated:
            headers[":repeated"] = self.repeated
        req = Request(self.parser.get_method().decode(), path, query, headers, body, self.client,
                      self.parser.should_keep_alive(), self.reserved, self.budget)
        self._reset()
        self.pending.append(req)
        self.state = BUSY
        if not self.busy:
            self._next()
        elif not self.paused:           # a pipelined request: read no more until its turn
            self.paused = True
            self.transport.pause_reading()

    # -- answering ------------------------------------------------------------------------ #
    def _next(self):
        self.busy = True
        self.server.loop.create_task(self._answer(self.pending.popleft()))

    async def _answer(self, req: Request):
        try:
            response = await self.server.app.handle(req)
        finally:
            req.release()
        if self.closed:
            return
        keep = req.keep_alive and not self.server.stopping
        self.transport.write(response.head(keep) + (b"" if req.method == "HEAD" else response.body))
        if self._writable is not None:
            await self._writable
        self.busy = False
        if not keep or self.closed:
            self.closed = True
            self.transport.close()
        elif self.pending:
            self._next()
        else:
            self._expect(IDLE, self.limits.keepalive_timeout)
            if self.paused:
                self.paused = False
                self.transport.resume_reading()

    def _fail(self, error: HTTPError):
        """Answer a request that cannot be read on (and close the connection)."""
        self.server.app.count_refusal(error.status)
        self._drop_body()
        if not self.closed and not self.busy:
            self.transport.write(error_bytes(error.status, str(error), error.headers))
        self.closed = True
        self.transport.close()

    def _hold(self, n: int):
        if n > self.budget.limit:
            raise _Refused(PayloadTooLarge(f"the body ({n:,} bytes) is over the server's in-flight limit"))
        if not self.budget.take(n):
            self.server.busy += 1
            raise _Refused(over_budget("the body"))
        self.reserved += n

    def _drop_body(self):
        if self.reserved:
            self.budget.give(self.reserved)
        self._reset()

    def _expect(self, state: int, seconds: float):
        self.state, self.deadline = state, self.server.loop.time() + seconds


class HTTPServer:
    """The listening side: connections, the deadline sweep, a graceful stop."""

    def __init__(self, app, limits: Limits, budget: Budget):
        self.app, self.limits, self.budget = app, limits, budget
        self.connections: set[Connection] = set()
        self.loop = None
        self.stopping = False
        self.refused = self.busy = self.timeouts = 0     # connections refused, 503s for memory, 408s
        self._server = None
        self._sweeper = None

    async def start(self, sock) -> None:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(lambda: Connection(self), sock=sock, backlog=2048)
        self._sweeper = self.loop.create_task(self._sweep())

    async def _sweep(self):
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            now = self.loop.time()
            for c in [c for c in self.connections if c.state != BUSY and c.deadline < now]:
                c.timed_out(now)

    async def stop(self, grace: float) -> None:
        """Stop accepting; let requests in progress finish (up to ``grace`` seconds); close."""
        self.stopping = True
        self._server.close()
        deadline = self.loop.time() + grace
        while any(c.busy for c in self.connections) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for c in list(self.connections):
            c.closed = True
            c.transport.close()
        self._sweeper.cancel()
