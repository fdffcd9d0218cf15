"""`gpu-mdf serve`: a real server in a child process on a loopback port, driven by
tritonclient.http and by raw HTTP (what curl sends); every test bounded in time."""

import http.client
import json
import secrets
import shutil
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from gpu_mdf.engine import compile
from gpu_mdf.serve.batcher import Batcher, Closed, QueueFull
from gpu_mdf.serve.errors import HTTPError as ProtocolError
from gpu_mdf.serve.launch import launch, launched
from gpu_mdf.serve.protocol import decode_body, parse_infer_request

pytest.importorskip("httptools")
th = pytest.importorskip("tritonclient.http")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mnist_softmax.mdf.json"


@pytest.fixture(scope="module")
def repo(tmp_path_factory, reference_mdf):
    d = tmp_path_factory.mktemp("models")
    (d / "mnist" / "1").mkdir(parents=True)
    shutil.copy(reference_mdf, d / "mnist" / "1" / "model.mdf.json")
    (d / "mnist" / "config.yaml").write_text("outputs: [probabilities]\nmax_queue_delay_ms: 2\n")
    (d / "softmax" / "1").mkdir(parents=True)
    shutil.copy(EXAMPLE, d / "softmax" / "1" / "model.mdf.json")
    return d


@pytest.fixture(scope="module")
def token(tmp_path_factory):
    t = secrets.token_urlsafe(24)
    p = tmp_path_factory.mktemp("secret") / "token.txt"
    p.write_text(t + "\n")
    return t, p


@pytest.fixture(scope="module")
def server(repo, token):
    srv = launch(repo, "--token-file", str(token[1]))
    yield srv
    assert srv.stop() == 0, "\n".join(srv.lines[-20:])


@pytest.fixture(scope="module")
def client(server, token):
    return th.InferenceServerClient(server.address, connection_timeout=30, network_timeout=60)


def auth(token):
    return {"Authorization": f"Bearer {token[0]}"}


def call(url, body=None, headers=None, method=None):
    """(status, headers, body) of one request, errors included."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def infer_json(server, token, model, x, datatype="UINT8", name="pixels", extra=None):
    doc = {"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}]}
    doc.update(extra or {})
    return call(f"{server.url}/v2/models/{model}/infer", json.dumps(doc).encode(),
                {**auth(token), "Content-Type": "application/json"})


@pytest.fixture(scope="module")
def digits(mnist):
    (_, _), (x, y) = mnist
    return x[:256], y[:256]


@pytest.fixture(scope="module")
def expected(reference_mdf, digits):
    return compile(reference_mdf, device="cpu").run(digits[0])


# --------------------------------------------------------------------------------- #
def test_health_metadata_and_auth(server, token, client):
    assert call(server.url + "/v2/health/live")[0] == 200          # health needs no token
    assert call(server.url + "/v2/health/ready")[0] == 200
    status, headers, body = call(server.url + "/v2/models/mnist")
    assert status == 401 and headers.get("www-authenticate") == "Bearer" and b"bearer token" in body
    assert call(server.url + "/v2/models/mnist", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert call(server.url + "/metrics")[0] == 401
    with pytest.raises(Exception, match="401|bearer"):
        client.get_model_metadata("mnist")
    h = auth(token)
    meta = client.get_server_metadata(headers=h)
    assert meta["name"] == "gpu-mdf" and "binary_tensor_data" in meta["extensions"] \
        and "model_repository" in meta["extensions"] and "gpu_mdf_convert" in meta["extensions"]
    md = client.get_model_metadata("mnist", headers=h)
    assert md["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 28, 28]}]
    assert md["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert md["versions"] == ["1"] and md["parameters"]["normalize"] == "l2"
    assert client.get_model_metadata("mnist", "1", headers=h)["name"] == "mnist"
    assert client.is_model_ready("mnist", headers=h) and client.is_model_ready("softmax", "1", headers=h)
    assert not client.is_model_ready("nope", headers=h)
    cfg = client.get_model_config("mnist", headers=h)
    assert cfg["max_batch_size"] == 256 and cfg["input"][0]["dims"] == [28, 28]


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer_equals_the_engine(client, token, digits, expected, binary):
    x, y = digits
    inp = th.InferInput("pixels", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = th.InferRequestedOutput("probabilities", binary_data=binary)
    r = client.infer("mnist", [inp], outputs=[out], headers=auth(token), request_id="r-1")
    assert r.get_response()["id"] == "r-1" and r.get_response()["model_version"] == "1"
    p = r.as_numpy("probabilities")
    np.testing.assert_allclose(p, expected, atol=1e-6)
    assert (p.argmax(1) == y).mean() > 0.85
    # no outputs named: tritonclient asks for all, in binary
    r = client.infer("mnist", [inp], headers=auth(token), model_version="1")
    np.testing.assert_allclose(r.as_numpy("probabilities"), expected, atol=1e-6)


def test_raw_json_and_float_input_and_compressed_body(server, token, reference_mdf, digits, expected):
    x = digits[0][:8]
    status, headers, body = infer_json(server, token, "mnist", x)
    assert status == 200 and headers["content-type"].startswith("application/json")
    doc = json.loads(body)
    out = doc["outputs"][0]
    assert out["name"] == "probabilities" and out["datatype"] == "FP32" and out["shape"] == [8, 10]
    np.testing.assert_allclose(np.array(out["data"]).reshape(8, 10), expected[:8], atol=1e-6)
    # (N, 784) works as (N, 28, 28); float input is taken as already normalised
    from gpu_mdf.data import normalize
    xf = normalize(x, "l2").reshape(8, 784)
    status, _, body = infer_json(server, token, "mnist", xf, "FP32")
    assert status == 200
    np.testing.assert_allclose(np.array(json.loads(body)["outputs"][0]["data"]).reshape(8, 10), expected[:8],
                               atol=1e-6)
    # gzip-compressed request body (tritonclient's request_compression_algorithm)
    raw = json.dumps({"inputs": [{"name": "pixels", "shape": [8, 28, 28], "datatype": "UINT8",
                                  "data": x.ravel().tolist()}]}).encode()
    gz = zlib.compressobj(wbits=31)
    status, _, body = call(f"{server.url}/v2/models/mnist/infer", gz.compress(raw) + gz.flush(),
                           {**auth(token), "Content-Encoding": "gzip"})
    assert status == 200, body


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, token, digits, expected):
    x = digits[0][:4]
    url = f"{server.url}/v2/models/mnist/infer"
    h = auth(token)

    def binary_body(shape, size_declared, payload):
        head = json.dumps({"inputs": [{"name": "pixels", "shape": shape, "datatype": "UINT8",
                                       "parameters": {"binary_data_size": size_declared}}]}).encode()
        return head + payload, {**h, "Inference-Header-Content-Length": str(len(head))}

    cases = {
        "unknown model": (f"{server.url}/v2/models/nope/infer", json.dumps({"inputs": []}).encode(), h, 404),
        "unknown version": (f"{server.url}/v2/models/mnist/versions/7/infer", b"{}", h, 404),
        "malformed JSON": (url, b'{"inputs": [', h, 400),
        "not an object": (url, b"[1, 2]", h, 400),
        "wrong shape": (url, json.dumps({"inputs": [{"name": "pixels", "shape": [2, 27], "datatype": "UINT8",
                                                    "data": [0] * 54}]}).encode(), h, 400),
        "shape and data disagree": (url, json.dumps({"inputs": [{"name": "pixels", "shape": [1, 784],
                                                               "datatype": "UINT8", "data": [0] * 10}]}).encode(),
                                    h, 400),
        "wrong datatype": (url, json.dumps({"inputs": [{"name": "pixels", "shape": [1, 1], "datatype": "BYTES",
                                                       "data": ["a"]}]}).encode(), h, 400),
        "out of range uint8": (url, json.dumps({"inputs": [{"name": "pixels", "shape": [1, 784],
                                                           "datatype": "UINT8", "data": [300] * 784}]}).encode(),
                               h, 400),
        "unknown input": (url, json.dumps({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "UINT8",
                                                      "data": [0] * 784}]}).encode(), h, 400),
        "unknown output": (url, json.dumps({"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8",
                                                       "data": [0] * 784}], "outputs": [{"name": "y"}]}).encode(),
                           h, 400),
        "unsupported parameter": (url, json.dumps({"inputs": [{"name": "pixels", "shape": [1, 784],
                                                              "datatype": "UINT8", "data": [0] * 784}],
                                                  "parameters": {"sequence_id": 3}}).encode(), h, 400),
        "classification output": (url, json.dumps({"inputs": [{"name": "pixels", "shape": [1, 784],
                                                              "datatype": "UINT8", "data": [0] * 784}],
                                                  "outputs": [{"name": "probabilities",
                                                               "parameters": {"classification": 3}}]}).encode(),
                                  h, 400),
        "NaN pixels": (url, b'{"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": ['
                       + b",".join([b"0"] * 783 + [b"NaN"]) + b"]}]}", h, 400),
        "unknown encoding": (url, b"{}", {**h, "Content-Encoding": "br"}, 415),
        "bad gzip": (url, b"not gzip", {**h, "Content-Encoding": "gzip"}, 400),
    }
    cases["truncated binary"] = (url, *binary_body([4, 28, 28], 4 * 784, x.tobytes()[:-10]), 400)
    cases["binary size mismatch"] = (url, *binary_body([4, 28, 28], 100, x.tobytes()), 400)
    cases["bytes after the binary data"] = (url, *binary_body([4, 28, 28], 4 * 784, x.tobytes() + b"xx"), 400)
    body, hh = binary_body([4, 28, 28], 4 * 784, x.tobytes())
    cases["header length too long"] = (url, body, {**hh, "Inference-Header-Content-Length": "999999"}, 400)
    cases["no such route"] = (f"{server.url}/v2/nothing", None, h, 404)
    cases["GET on infer"] = (url, None, h, 405)
    for what, (u, b, hdr, code) in cases.items():
        status, headers, resp = call(u, b, hdr)
        assert status == code, (what, status, resp)
        assert "error" in json.loads(resp), what
        # still serving, correctly
        status, _, good = infer_json(server, token, "mnist", x)
        assert status == 200, what
        np.testing.assert_allclose(np.array(json.loads(good)["outputs"][0]["data"]).reshape(4, 10), expected[:4],
                                   atol=1e-6)


def test_oversized_body_is_refused_before_it_is_read(repo, token):
    with launched(repo, "--token-file", str(token[1]), "--max-body-mb", "1") as srv:
        # the answer comes from the declared length, before any of the body is sent (a client
        # still sending when the server closes may see a reset instead of the answer: the
        # deterministic form of the check sends the headers alone)
        conn = http.client.HTTPConnection(srv.address, timeout=60)
        conn.putrequest("POST", "/v2/models/mnist/infer")
        for k, v in {**auth(token), "Content-Length": str(2 << 20)}.items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        assert r.status == 413 and b"limit" in r.read()
        conn.close()
        # and one that claims no length (chunked) is cut off while it is read
        conn = http.client.HTTPConnection(srv.address, timeout=60)
        conn.putrequest("POST", "/v2/models/mnist/infer")
        for k, v in {**auth(token), "Transfer-Encoding": "chunked"}.items():
            conn.putheader(k, v)
        conn.endheaders()
        try:
            for _ in range(4):
                chunk = b"0" * (512 << 10)
                conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            conn.send(b"0\r\n\r\n")
        except OSError:
            pass                      # the server answered and closed before the body ended
        r = conn.getresponse()
        assert r.status == 413 and b"limit" in r.read()
        conn.close()
        assert call(srv.url + "/v2/health/ready")[0] == 200


def test_repository_load_unload_index(server, token, client, repo, digits):
    h = auth(token)
    index = client.get_model_repository_index(headers=h)
    assert {(m["name"], m.get("version"), m["state"]) for m in index} >= {("mnist", "1", "READY"),
                                                                           ("softmax", "1", "READY")}
    client.unload_model("softmax", headers=h)
    assert not client.is_model_ready("softmax", headers=h)
    status, _, body = infer_json(server, token, "softmax", digits[0][:2])
    assert status == 400 and b"not ready" in body
    # a new version appears on disk; load picks it up without a restart
    (repo / "softmax" / "2").mkdir()
    shutil.copy(EXAMPLE, repo / "softmax" / "2" / "model.mdf.json")
    client.load_model("softmax", headers=h)
    assert client.is_model_ready("softmax", "2", headers=h)
    assert client.get_model_metadata("softmax", headers=h)["versions"] == ["1", "2"]
    status, _, body = infer_json(server, token, "softmax", digits[0][:2])
    assert status == 200 and json.loads(body)["model_version"] == "2"
    # a broken model is refused with its reason, and the others keep serving
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.mdf.json").write_text("{not json")
    with pytest.raises(Exception, match="broken"):
        client.load_model("broken", headers=h)
    # issue 22: a model that failed to load is UNAVAILABLE with its reason; the server stays ready
    assert call(server.url + "/v2/health/ready")[0] == 200
    row = next(r for r in client.get_model_repository_index(headers=h) if r["name"] == "broken")
    assert row["state"] == "UNAVAILABLE" and "model.mdf.json" in row["reason"] and str(repo) not in row["reason"]
    client.unload_model("broken", headers=h)
    assert call(server.url + "/v2/health/ready")[0] == 200
    assert call(f"{server.url}/v2/repository/models/..%2Fetc/load", b"{}", h)[0] in (400, 404)
    assert call(f"{server.url}/v2/repository/models/nope/unload", b"{}", h)[0] == 404
    shutil.rmtree(repo / "broken")
    client.load_model("mnist", headers=h)
    assert client.is_model_ready("mnist", headers=h)


def test_concurrent_requests_are_batched_and_metrics_say_so(server, token, digits, expected):
    x = digits[0]

    def one(i):
        status, _, body = infer_json(server, token, "mnist", x[i:i + 1])
        return status, np.array(json.loads(body)["outputs"][0]["data"]) if status == 200 else None

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(128)))
    assert all(s == 200 for s, _ in results)
    for i, (_, p) in enumerate(results):
        np.testing.assert_allclose(p, expected[i], atol=1e-6)   # each client got its own row
    text = call(server.url + "/metrics", headers=auth(token))[2].decode()
    sums = {ln.split("{")[0]: ln for ln in text.splitlines()
            if ln.startswith("gpu_mdf_batch_requests_") and 'model="mnist"' in ln}
    count = float(sums["gpu_mdf_batch_requests_count"].split()[-1])
    total = float(sums["gpu_mdf_batch_requests_sum"].split()[-1])
    assert total / count > 1.2, "no batching happened"
    for name in ("gpu_mdf_requests_total", "gpu_mdf_queue_seconds_bucket", "gpu_mdf_compute_seconds_sum",
                 "gpu_mdf_items_total", "gpu_mdf_items_per_second", "gpu_mdf_device_memory_bytes",
                 "gpu_mdf_http_requests_total", "gpu_mdf_request_failures_total"):
        assert name in text, name


def test_bounded_load_no_failures_no_lost_responses_flat_memory(server, token, digits, expected):
    """16 clients for 2 s, three rounds: every request answered right; memory flat."""
    x = digits[0]

    def client_loop(seed, stop):
        c = th.InferenceServerClient(server.address, connection_timeout=30, network_timeout=60)  # one per thread
        rng = np.random.default_rng(seed)
        sent = ok = 0
        while time.monotonic() < stop:
            i = int(rng.integers(0, len(x) - 4))
            n = int(rng.integers(1, 5))
            inp = th.InferInput("pixels", [n, 28, 28], "UINT8")
            inp.set_data_from_numpy(x[i:i + n])
            sent += 1
            r = c.infer("mnist", [inp], headers=auth(token))
            if np.allclose(r.as_numpy("probabilities"), expected[i:i + n], atol=1e-6):
                ok += 1
        return sent, ok

    def rss():
        text = call(server.url + "/metrics", headers=auth(token))[2].decode()
        line = next(ln for ln in text.splitlines() if ln.startswith('gpu_mdf_device_memory_bytes{device="cpu"'))
        return float(line.split()[-1])

    sizes = []
    for round_ in range(3):
        stop = time.monotonic() + 2.0
        with ThreadPoolExecutor(16) as pool:
            res = list(pool.map(client_loop, range(16 * round_, 16 * round_ + 16), [stop] * 16))
        sent, ok = sum(r[0] for r in res), sum(r[1] for r in res)
        assert sent > 50 and ok == sent, (sent, ok)
        sizes.append(rss())
    assert sizes[2] - sizes[1] < 64 << 20, sizes


def test_convert_endpoint_returns_or_registers_mdf(server, token, client, repo, reference_model, digits, expected):
    _, keras_path = reference_model
    h = auth(token)
    status, _, body = call(f"{server.url}/v2/convert?normalize=l2", keras_path.read_bytes(),
                           {**h, "Content-Type": "application/octet-stream"})
    assert status == 200, body
    doc = json.loads(body)
    np.testing.assert_allclose(compile(doc, device="cpu").run(digits[0]), expected, atol=1e-6)
    status, _, body = call(f"{server.url}/v2/convert?name=uploaded", keras_path.read_bytes(), h)
    assert status == 201, body
    assert json.loads(body) == {"name": "uploaded", "version": "1", "state": "READY", "reason": ""}
    assert (repo / "uploaded" / "1" / "model.mdf.json").is_file()
    status, _, body = infer_json(server, token, "uploaded", digits[0][:4])
    assert status == 200
    assert call(f"{server.url}/v2/convert", b"hello", h)[0] == 415
    assert call(f"{server.url}/v2/convert?name=../x", keras_path.read_bytes(), h)[0] == 400
    assert call(f"{server.url}/v2/convert?format=yaml", keras_path.read_bytes(), h)[0] == 400
    bad = b"PK\x03\x04" + b"\x00" * 100
    status, _, body = call(f"{server.url}/v2/convert", bad, h)
    assert status == 422 and b"not a valid .keras archive" in body


def test_convert_refuses_lambda_and_runs_nothing(server, token, tmp_path):
    keras = pytest.importorskip("keras")
    marker = tmp_path / "pwned"
    i = keras.Input((4,))
    # the Lambda's code would write the marker file if it ever ran
    o = keras.layers.Lambda(lambda t, p=str(marker): (open(p, "w").close(), t)[1])(keras.layers.Dense(3)(i))
    path = tmp_path / "lam.h5"
    keras.Model(i, o).save(path)
    marker.unlink(missing_ok=True)        # saving traced the Lambda once, here in the test
    status, _, body = call(f"{server.url}/v2/convert", path.read_bytes(), auth(token))
    assert status == 422 and b"Lambda" in body and b"safe mode" in body
    assert not marker.exists()
    assert call(server.url + "/v2/health/ready")[0] == 200


def test_graceful_shutdown_finishes_in_flight_requests(repo, token, tmp_path, digits):
    d = tmp_path / "models"
    (d / "slow" / "1").mkdir(parents=True)
    shutil.copy(EXAMPLE, d / "slow" / "1" / "model.mdf.json")
    (d / "slow" / "config.yaml").write_text("max_queue_delay_ms: 1500\n")   # a batch waits 1.5 s for company
    srv = launch(d, "--no-access-log")
    result = {}

    def request():
        result["r"] = call(f"{srv.url}/v2/models/slow/infer", json.dumps(
            {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8",
                         "data": digits[0][0].ravel().tolist()}]}).encode())
    t = threading.Thread(target=request)
    t.start()
    time.sleep(0.5)                        # the request is waiting in its batch
    rc = srv.stop()
    t.join(30)
    assert rc == 0 and result["r"][0] == 200, (rc, result, srv.lines[-5:])
    assert srv.lines[-1] == "stopped"


# --------------------------------------------------------------------------------- #
# the parts on their own
def test_batcher_bounds_its_queue_and_drains_on_close():
    gate = threading.Event()
    ran = []

    def run(feeds):
        gate.wait(10)
        ran.append(len(feeds["x"]))
        return {"y": feeds["x"] * 2}

    b = Batcher(run, "t", max_batch_size=8, max_queue_delay=0, max_queue_size=1)
    done = []
    b.submit({"x": np.ones((1, 2))}, lambda *a: done.append(a))   # taken by the worker, blocked
    time.sleep(0.2)
    b.submit({"x": np.ones((2, 2))}, lambda *a: done.append(a))   # waits in the queue
    with pytest.raises(QueueFull, match="queue is full"):
        b.submit({"x": np.ones((1, 2))}, lambda *a: None)
    gate.set()
    b.close()
    assert ran == [1, 2] and [d[0]["y"].shape for d in done] == [(1, 2), (2, 2)]
    with pytest.raises(Closed):
        b.submit({"x": np.ones((1, 2))}, lambda *a: None)


def test_batcher_gathers_splits_and_keeps_dtypes_apart():
    seen = []

    def run(feeds):
        seen.append((len(feeds["x"]), feeds["x"].dtype))
        return {"y": feeds["x"].astype(np.float64) + 1}

    b = Batcher(run, "t", max_batch_size=6, max_queue_delay=0.3)
    out = {}
    for i, (n, dt) in enumerate([(2, np.uint8), (3, np.uint8), (1, np.float32), (4, np.uint8)]):
        b.submit({"x": np.full((n, 1), i, dt)}, lambda o, e, s, i=i: out.__setitem__(i, (o, e, s)))
    b.close()
    assert seen[0] == (5, np.uint8)             # the first two together; the float request not mixed in
    assert all(out[i][0]["y"][0, 0] == i + 1 for i in range(4))
    assert out[0][2]["batch_items"] == 5 and len(out[0][0]["y"]) == 2 and len(out[1][0]["y"]) == 3


def test_protocol_refuses_what_it_does_not_handle():
    ok = json.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    req = parse_infer_request(ok.encode(), None, {"x": True}, ["y"])
    assert req.inputs["x"].dtype == np.float32 and req.items == 2
    for body, match in [
        ({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}], "extra": 1},
         "unknown request field"),
        ({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "INT8", "data": [1.5, 2]}]}, "fractions"),
        ({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [True, False]}]}, "numbers"),
        ({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": ["a", "b"]}]}, "numbers"),
        ({"inputs": [{"name": "x", "shape": [0, 2], "datatype": "FP32", "data": []}]}, "empty"),
        ({"inputs": []}, "non-empty"),
    ]:
        with pytest.raises(ProtocolError, match=match):
            parse_infer_request(json.dumps(body).encode(), None, {"x": True}, ["y"])
    bomb = zlib.compress(b"0" * (10 << 20))
    with pytest.raises(ProtocolError, match="over the"):
        decode_body(bomb, "deflate", 1 << 20)
    assert decode_body(zlib.compress(b"abc"), "deflate", 10) == b"abc"
