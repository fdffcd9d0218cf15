"""Issue 22's findings, one test each (numbered as in the issue): a real server in a child
process on a loopback port, driven by raw HTTP; every test bounded in time."""

import gzip
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_helpers import ROOT, call, infer_doc, make_token, model_repo, one_line_no_path, raw

from gpu_mdf.serve.errors import HTTPError
from gpu_mdf.serve.launch import launch, launched
from gpu_mdf.serve.protocol import decode_body, parse_infer_request

pytest.importorskip("httptools")


@pytest.fixture(scope="module")
def token(tmp_path_factory):
    return make_token(tmp_path_factory.mktemp("secret"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return model_repo(tmp_path_factory.mktemp("models"), softmax=None, other=None)


def escape_to(repo, tmp_path):
    """A model folder that is a symbolic link leading outside the repository."""
    model_repo(tmp_path / "outside", elsewhere=None)
    (repo / "escape").symlink_to(tmp_path / "outside" / "elsewhere", target_is_directory=True)


@pytest.fixture(scope="module")
def server(repo, token):
    srv = launch(repo, "--token-file", str(token[1]), "--no-access-log")
    yield srv
    assert srv.stop() == 0, "\n".join(srv.lines[-20:])


def auth(token):
    return {"Authorization": f"Bearer {token[0]}"}


def pixels(n=1):
    return np.arange(n * 784, dtype=np.uint8).reshape(n, 784) % 251


# -- 2. one bad model folder ------------------------------------------------------------- #
def test_2_a_model_folder_leading_outside_does_not_stop_the_server(tmp_path, token):
    repo = model_repo(tmp_path / "models", softmax=None)
    escape_to(repo, tmp_path)
    with launched(repo, "--token-file", str(token[1]), "--no-access-log") as server:
        index = json.loads(call(server.url + "/v2/repository/index", b"{}", auth(token))[2])
        row = next(r for r in index if r["name"] == "escape")
        assert row["state"] == "UNAVAILABLE" and "outside" in row["reason"] and str(tmp_path) not in row["reason"]
        assert call(f"{server.url}/v2/models/softmax/infer", infer_doc(pixels()), auth(token))[0] == 200
        assert call(server.url + "/v2/health/ready")[0] == 200


def test_2_loading_a_folder_leading_outside_at_run_time_is_a_400(server, token, repo, tmp_path):
    escape_to(repo, tmp_path)
    try:
        status, _, body = call(f"{server.url}/v2/repository/models/escape/load", b"{}", auth(token))
        assert status == 400 and "outside" in one_line_no_path(body, repo, tmp_path)
        one_line_no_path(body, repo, "/tmp/")
    finally:
        (repo / "escape").unlink()
        call(f"{server.url}/v2/repository/models/escape/unload", b"{}", auth(token))


# -- 3. loading a name that does not exist ------------------------------------------------- #
def test_3_loading_an_unknown_name_is_a_404_that_leaves_no_trace(server, token):
    status, _, body = call(f"{server.url}/v2/repository/models/nosuch/load", b"{}", auth(token))
    assert status == 404
    status, _, body = call(server.url + "/v2/health/ready")
    assert status == 200 and b"nosuch" not in body
    index = json.loads(call(server.url + "/v2/repository/index", b"{}", auth(token))[2])
    assert "nosuch" not in {r["name"] for r in index}


def test_3_readiness_waits_for_models_still_loading_and_never_names_them(tmp_path):
    from gpu_mdf.serve.repository import Repository
    repo = Repository(model_repo(tmp_path, a=None), device="cpu", log=lambda m: None)
    started, release = threading.Event(), threading.Event()
    compile_model = repo._compile_model

    def slow(name):
        started.set()
        release.wait(10)
        return compile_model(name)
    repo._compile_model = slow
    t = threading.Thread(target=repo.load, args=("a",))
    t.start()
    started.wait(10)
    assert repo.loading_count() == 1
    release.set()
    t.join(30)
    assert repo.loading_count() == 0 and repo.models["a"].state == "READY"
    repo.close()


# -- 4. conversion cannot fill the disk ------------------------------------------------------ #
def test_4_archive_members_are_capped_before_extraction(tmp_path, token):
    pytest.importorskip("keras")
    d = model_repo(tmp_path / "models", softmax=None)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("metadata.json", "{}")
        for i in range(3):
            z.writestr(f"assets/blob{i}.bin", b"\0" * (24 << 20))     # 72 MiB inflated, ~70 KB sent
    upload = buf.getvalue()
    assert len(upload) < 1 << 20
    with launched(d, "--token-file", str(token[1]), "--convert-disk-mb", "32", "--no-access-log") as srv:
        status, _, body = call(f"{srv.url}/v2/convert?normalize=l2", upload, auth(token))
        assert status == 422 and "inflates to" in one_line_no_path(body, tmp_path)
        many = io.BytesIO()
        with zipfile.ZipFile(many, "w") as z:
            for i in range(1001):
                z.writestr(f"m{i}", b"")
        status, _, body = call(f"{srv.url}/v2/convert?normalize=l2", many.getvalue(), auth(token))
        assert status == 422 and "members" in one_line_no_path(body)
    assert not list((tmp_path / "models").glob("**/gpu-mdf-convert-*"))


def test_4_the_worker_is_limited_and_isolated(tmp_path):
    """RLIMIT_FSIZE stops a write past the quota; where namespaces are allowed (root here)
    the worker has no network and a tmpfs quota as its temp folder."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code = f"""
import socket, sys
from gpu_mdf.serve.convert_worker import isolate, limit
print(isolate({str(tmp)!r}, 4 << 20))
limit(1 << 31, 30, 4 << 20)
import signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
try:
    open({str(tmp / 'big')!r}, 'wb').write(b'0' * (8 << 20)); print('wrote')
except OSError as e: print('refused', e.errno)
try:
    socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')
except OSError: print('no network')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    listener.close()
    lines = r.stdout.split("\n")
    assert "refused 27" in r.stdout, r.stdout + r.stderr         # EFBIG
    if "no network" in lines[0]:
        assert "no network" in lines and "connected" not in lines, r.stdout
    else:
        pytest.skip(f"this OS allows no namespaces: {lines[0]}")


def test_4_convert_into_an_existing_name_needs_overwrite(server, token, reference_model, repo):
    _, keras_path = reference_model
    status, _, body = call(f"{server.url}/v2/convert?name=softmax&normalize=l2", keras_path.read_bytes(),
                           auth(token))
    assert status == 409 and "overwrite=true" in one_line_no_path(body, repo)
    assert not (repo / "softmax" / "2").exists()
    status, _, body = call(f"{server.url}/v2/convert?name=other&normalize=l2&overwrite=true",
                           keras_path.read_bytes(), auth(token))
    assert status == 201 and json.loads(body)["version"] == "2", body


# -- 5. the KServe SDK's typed request fields ----------------------------------------------- #
def test_5_model_name_and_version_in_the_body_are_taken_when_they_match():
    doc = {"model_name": "m", "model_version": "1", "id": "a",
           "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
    req = parse_infer_request(json.dumps(doc).encode(), None, {"x": True}, ["y"], ("m", "1"))
    assert req.items == 1
    req = parse_infer_request(json.dumps(doc).encode(), None, {"x": True}, ["y"], ("m", None))
    with pytest.raises(HTTPError, match="model_name"):
        parse_infer_request(json.dumps(doc).encode(), None, {"x": True}, ["y"], ("other", None))


# -- 6. malformed requests are 400s, one line, no path ------------------------------------------ #
def malformed_cases():
    def doc(**tensor):
        t = {"name": "pixels", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}
        t.update(tensor)
        return {"inputs": [t]}
    cases = {
        "datatype object": doc(datatype={}), "datatype list": doc(datatype=[]), "datatype number": doc(datatype=3),
        "parameters list": {**doc(), "parameters": [1]}, "parameters string": {**doc(), "parameters": "x"},
        "input parameters list": doc(parameters=[]), "output parameters list":
            {**doc(), "outputs": [{"name": "dense_out", "parameters": 5}]},
        "outputs not a list": {**doc(), "outputs": {"name": "dense_out"}},
        "shape 2**32 squared": doc(shape=[2**32, 2**32]), "shape 2**64": doc(shape=[2**64]),
        "65 dims": doc(shape=[1] * 65), "40 dims": doc(shape=[1] * 40),
        "boolean dims": doc(shape=[True, 784]), "float dims": doc(shape=[1.0, 784]), "string dims": doc(shape=["1"]),
        "binary_data_output 'no'": {**doc(), "parameters": {"binary_data_output": "no"}},
        "binary_data 1": {**doc(), "outputs": [{"name": "dense_out", "parameters": {"binary_data": 1}}]},
        "binary_data_size true": doc(data=None, parameters={"binary_data_size": True}),
        "id a number": {**doc(), "id": 5}, "inputs an object": {"inputs": {}},
        "data of objects": doc(data=[{}] * 784), "data nested ragged": doc(data=[[0], [0, 0]]),
        "data null": doc(data=None), "name a list": doc(name=["pixels"]),
        "model_name of another model": {**doc(), "model_name": "other"},
    }
    cases["binary_data_size true"]["inputs"][0].pop("data")
    out = {k: json.dumps(v).encode() for k, v in cases.items()}
    out["nested 1,000 deep"] = b'{"inputs": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    out["nested 100,000 deep"] = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    out["data nested 2,000 deep"] = (b'{"inputs": [{"name": "pixels", "shape": [1], "datatype": "UINT8", "data": '
                                     + b"[" * 2000 + b"0" + b"]" * 2000 + b"}]}")
    out["invalid UTF-8"] = b'{"id": "\xff", "inputs": []}'
    out["NaN literal"] = b'{"inputs": [{"name": "pixels", "shape": [1, 1], "datatype": "FP32", "data": [NaN]}]}'
    out["1e400"] = b'{"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": [1e400' \
        + b",0" * 783 + b"]}]}"
    return out


@pytest.mark.parametrize("case", sorted(malformed_cases()))
def test_6_malformed_requests_are_400_with_one_line(server, token, repo, case):
    body = malformed_cases()[case]
    status, _, resp = call(f"{server.url}/v2/models/softmax/infer", body, auth(token))
    assert status == 400, (case, status, resp[:300])
    one_line_no_path(resp, repo, ROOT)


def test_6_malformed_binary_requests_and_headers(server, token):
    url = f"{server.url}/v2/models/softmax/infer"
    head = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8",
                                   "parameters": {"binary_data_size": 784}}]}).encode()
    for length in ("-1", "1e3", "0x10", " 5", "99999999999999999999"):
        status, _, body = call(url, head + bytes(784), {**auth(token), "Inference-Header-Content-Length": length})
        assert status == 400, (length, body)
    answer = raw(server.address, b"POST /v2/models/softmax/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                 b"Content-Length: 6\r\n\r\nhello!")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert raw(server.address, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")


# -- 7. 405 carries Allow ----------------------------------------------------------------- #
def test_7_405_carries_allow(server, token):
    for path, method, allow in (("/v2/models/softmax/infer", "GET", "POST"), ("/v2/health/live", "POST", "GET, HEAD"),
                                ("/v2/repository/index", "DELETE", "POST"), ("/metrics", "PUT", "GET, HEAD")):
        status, headers, _ = call(server.url + path, b"{}" if method != "GET" else None, auth(token), method=method)
        assert status == 405 and headers.get("allow") == allow, (path, method, status, headers)


# -- 8. a reload is seamless ------------------------------------------------------------------ #
def test_8_reloading_loses_no_request(server, token):
    url, stop, statuses = f"{server.url}/v2/models/other/infer", time.monotonic() + 4, []

    def client():
        import http.client
        host, port = server.address.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        while time.monotonic() < stop:
            conn.request("POST", "/v2/models/other/infer", infer_doc(pixels()), auth(token))
            r = conn.getresponse()
            r.read()
            statuses.append(r.status)
        conn.close()
    with ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(client) for _ in range(8)]
        reloads = 0
        while time.monotonic() < stop - 0.5:
            assert call(f"{server.url}/v2/repository/models/other/load", b"{}", auth(token))[0] == 200
            reloads += 1
        for f in futures:
            f.result()
    assert reloads >= 3 and len(statuses) > 100, (reloads, len(statuses))
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert call(url, infer_doc(pixels()), auth(token))[0] == 200


# -- 9. the smaller points ---------------------------------------------------------------------- #
def test_9_messages_are_one_line_with_balanced_quotes(server, token, repo):
    for name in ("nosuch", "a'b", "x%22y", "%0Anew", "n" * 300, "%C3%A9t%C3%A9", "..%2F..%2Fetc"):
        status, _, body = call(f"{server.url}/v2/models/{name}/infer", infer_doc(pixels()), auth(token))
        assert status in (400, 404), (name, status)
        message = one_line_no_path(body, repo)
        assert message.count("'") % 2 == 0 or '"' in message, message


def test_9_gzip_truncated_or_with_a_second_member_is_refused(server, token):
    body = infer_doc(pixels())
    whole = gzip.compress(body)
    url = f"{server.url}/v2/models/softmax/infer"
    h = {**auth(token), "Content-Encoding": "gzip"}
    assert call(url, whole, h)[0] == 200
    for bad in (whole[:-12], whole[:len(whole) // 2], whole + gzip.compress(b"{}"), whole + b"junk"):
        status, _, resp = call(url, bad, h)
        assert status == 400, (status, resp)
    with pytest.raises(HTTPError, match="truncated"):
        decode_body(zlib.compress(b"abc" * 100)[:-3], "deflate", 1 << 20)


def test_9_duplicate_authorization_headers_are_refused(server, token):
    req = (f"GET /v2/models/softmax HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
           f"Authorization: Bearer {token[0]}\r\nConnection: close\r\n\r\n").encode()
    assert raw(server.address, req).startswith(b"HTTP/1.1 400")
    req = f"GET /v2/models/softmax HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token[0]}\r\nConnection: close\r\n\r\n"
    assert raw(server.address, req.encode()).startswith(b"HTTP/1.1 200")


# -- 10. the README ---------------------------------------------------------------------------- #
def serving_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Serving"):text.index("\n## ", text.index("## Serving") + 5)]


def test_10_the_readme_python_example_runs_against_a_converted_model(tmp_path, token, reference_mdf):
    th = pytest.importorskip("tritonclient.http")
    d = model_repo(tmp_path / "models", mnist=reference_mdf)         # as gpu-mdf converted it: no config
    code = re.search(r"```python\n(import tritonclient.http.*?)```", serving_section(), re.S).group(1)
    with launched(d, "--token-file", str(token[1]), "--no-access-log") as srv:
        scope = {"images_uint8": np.zeros((64, 28, 28), np.uint8), "token": token[0]}
        exec(code.replace('"localhost:8000"', repr(srv.address)), scope)
        assert th is not None and scope["probabilities"].shape == (64, 10)


def test_10_serve_help_and_readme_curl_send_the_token():
    from click.testing import CliRunner

    from gpu_mdf.cli import main
    text = CliRunner().invoke(main, ["serve", "--help"]).output
    curls = [line for line in text.splitlines() if "curl" in line]
    assert curls and all("Authorization: Bearer" in line for line in curls), text
    section = serving_section()
    assert all("Authorization: Bearer" in line for line in section.splitlines() if line.startswith("curl "))
    assert "RLIMIT_FSIZE" in section and "network namespace" in section, "the sandbox is described as it is"


def test_5_load_and_unload_bodies_refuse_unknown_fields(server, token):
    status, _, body = call(f"{server.url}/v2/repository/models/softmax/unload", b'{"x": 1}', auth(token))
    assert status == 400
    assert call(f"{server.url}/v2/repository/index", b'{"ready": "yes"}', auth(token))[0] == 400


def test_pipelined_requests_are_answered_in_order(server, token):
    one = (f"GET /v2/models/softmax HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token[0]}\r\n\r\n"
           f"GET /v2/models/other HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token[0]}\r\n\r\n"
           "GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").encode()
    answer = raw(server.address, one)
    assert answer.count(b"HTTP/1.1 200") == 3, answer[:400]
    assert answer.index(b'"name":"softmax"') < answer.index(b'"name":"other"') < answer.index(b'"live":true')
