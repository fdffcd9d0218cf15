"""What the serve tests share: raw HTTP calls (what curl sends) and small repositories."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mnist_softmax.mdf.json"


def call(url, body=None, headers=None, method=None, timeout=60):
    """(status, headers, body) of one request, errors included."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def raw(address: str, data: bytes, timeout: float = 30) -> bytes:
    """Send ``data`` as it is on a new connection; everything the server answers until it
    closes (or ``timeout``)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def infer_doc(x, name="pixels", datatype="UINT8", **extra) -> bytes:
    doc = {"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}]}
    doc.update(extra)
    return json.dumps(doc).encode()


def model_repo(root: Path, **models: Path | None) -> Path:
    """``root`` holding each named model as version 1 (the example MDF when None)."""
    for name, source in models.items():
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy(source or EXAMPLE, root / name / "1" / "model.mdf.json")
    return root


def one_line_no_path(body: bytes, *paths) -> str:
    """The error message of a JSON error body, checked to be one line naming no server path."""
    message = json.loads(body)["error"]
    assert "\n" not in message, message
    for p in paths:
        assert str(p) not in message, message
    return message


def make_token(folder: Path) -> tuple[str, Path]:
    """A random bearer token and the --token-file holding it."""
    token = secrets.token_urlsafe(24)
    path = folder / "token.txt"
    path.write_text(token + "\n")
    return token, path
