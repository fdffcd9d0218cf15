"""Routes: a path template with its methods, the endpoint that answers it and the label
its requests are counted under in ``/metrics``; and the table's matcher.

A template names a path segment ``{name}`` (any text but ``/``) and puts an optional
part in brackets: ``/v2/models/{name}[/versions/{version}]/infer``. An optional part
that is absent gives its parameters as ``None``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_TOKEN = re.compile(r"\{(\w+)\}|\[|\]|[^{}\[\]]+")


def template_regex(template: str) -> re.Pattern:
    """The regular expression matching the whole of a path template."""
    parts = []
    for match in _TOKEN.finditer(template):
        token, parameter = match.group(0), match.group(1)
        if parameter:
            parts.append(f"(?P<{parameter}>[^/]+)")
        elif token in "[]":
            parts.append("(?:" if token == "[" else ")?")
        else:
            parts.append(re.escape(token))
    return re.compile("".join(parts))


@dataclass(frozen=True)
class Route:
    method: str          # GET routes also answer HEAD
    template: str
    endpoint: str        # the name of the Endpoints method that answers
    label: str           # the route label of gpu_mdf_http_requests_total
    methods: tuple[str, ...] = field(init=False)
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "methods", (self.method, "HEAD") if self.method == "GET" else (self.method,))
        object.__setattr__(self, "regex", template_regex(self.template))


class Router:
    """The routes of a table in order, each with the handler that answers it."""

    def __init__(self, routes: list[Route], endpoints):
        self.routes = [(route, getattr(endpoints, route.endpoint)) for route in routes]

    def match(self, path: str):
        """``(route, handler, path parameters)`` of the first route whose template matches
        ``path`` (whatever the method), or ``(None, None, None)``."""
        for route, handler in self.routes:
            match = route.regex.fullmatch(path)
            if match:
                return route, handler, match.groupdict()
        return None, None, None

    def slash_twin(self, path: str) -> str | None:
        """``path`` with its trailing slash removed or added, when that matches a route (a
        redirect target); None otherwise."""
        if path == "/":
            return None
        twin = path.rstrip("/") if path.endswith("/") else path + "/"
        return twin if self.match(twin)[0] is not None else None
