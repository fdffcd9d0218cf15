"""The server's refusals: each error class carries its HTTP status (and any headers the
response needs), so whatever raises one decides the answer, and one function,
:func:`status_of`, maps every exception to a status.

Any other :class:`~gpu_mdf.errors.GpuMdfError` (bad data, a bad model name, a config the
model cannot load with) is the client's to fix: 400. Anything else is a bug: 500.
"""

from __future__ import annotations

import re

from ..errors import GpuMdfError


class HTTPError(GpuMdfError):
    """A request the server refuses: ``status`` is the HTTP code, the message says why."""
    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None, status: int | None = None):
        super().__init__(message)
        self.headers = headers or {}
        if status is not None:
            self.status = status


class BadRequest(HTTPError):
    status = 400


class NotReady(BadRequest):
    """The model exists but did not load, or was unloaded."""


class Unauthorized(HTTPError):
    status = 401


class NotFound(HTTPError):
    status = 404


class NotAllowed(HTTPError):
    status = 405


class Conflict(HTTPError):
    status = 409


class PayloadTooLarge(HTTPError):
    status = 413


class UnsupportedMediaType(HTTPError):
    status = 415


class Unprocessable(HTTPError):
    """An upload that arrived whole but cannot be converted."""
    status = 422


class ServerError(HTTPError):
    """A failure the server reports itself (and has logged where that helps)."""
    status = 500


class Unimplemented(HTTPError):
    """A feature this installation lacks (an extra that is not installed)."""
    status = 501


class Unavailable(HTTPError):
    """Try again later: a full queue, a model unloading, conversions waiting."""
    status = 503


def status_of(exc: BaseException) -> int:
    """The HTTP status for ``exc``: an HTTPError's own, 400 for any other GpuMdfError,
    500 for anything else (a bug)."""
    if isinstance(exc, GpuMdfError):
        return getattr(exc, "status", 400)
    return 500


_ABSOLUTE = re.compile(r"(?<![\w.:/\\])/(?:[^\s'\"/,;()\[\]{}]+/)+([^\s'\",;()\[\]{}]*)")


def public_message(exc: BaseException, root: str | None = None) -> str:
    """The one-line message a client sees: its first line, with the repository folder
    dropped from paths inside it and any other absolute path cut to its last part."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return scrub_paths(text, root)


def scrub_paths(text: str, root: str | None = None) -> str:
    if root:
        text = text.replace(root.rstrip("/") + "/", "")
    return _ABSOLUTE.sub(lambda m: m.group(1) or "/", text)
