"""The KServe v2 / Open Inference Protocol's REST messages, with Triton's binary tensor
data extension: parsing inference requests and writing responses. No web framework
here: bytes in, NumPy arrays out, and back (so it is tested on its own).

Binary tensor data (what ``tritonclient.http`` sends by default): the body is the JSON
header of ``Inference-Header-Content-Length`` bytes followed by the raw little-endian
bytes of each input whose ``parameters.binary_data_size`` is set, in input order; the
response does the same for outputs asked for with ``parameters.binary_data`` (or for all,
with the request's ``parameters.binary_data_output``).

A request refused is one of :mod:`.errors`' HTTP errors (mostly ``BadRequest``, 400).
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, field

import numpy as np
import orjson

from .errors import BadRequest, PayloadTooLarge, ServerError, UnsupportedMediaType

# v2 datatypes this server takes (BYTES, BOOL and BF16 are not pixel data)
DATATYPES = {"UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
             "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
DATATYPE_OF = {np.dtype(v): k for k, v in DATATYPES.items()}
# request-level parameters understood; any other is refused rather than ignored
REQUEST_PARAMETERS = {"binary_data_output"}
OUTPUT_PARAMETERS = {"binary_data"}


MAX_DIMS = 32
# what a JSON body can grow into once parsed, per byte of its text (measured: 14x for
# pixel lists, 20x for floats, 36x for lists of empty objects): a JSON request holds this
# much of the server's in-flight budget while it is parsed
JSON_EXPANSION = 40
INFLATE_STEP = 1 << 20


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]                          # by input name, batch axis first
    outputs: list[tuple[str, bool]] = field(default_factory=list)   # (name, binary); [] = all
    binary_output: bool = False                              # the request's binary_data_output
    layout: tuple | None = None     # every input's (name, dtype, shape, offset) when all are binary

    @property
    def items(self) -> int:
        return len(next(iter(self.inputs.values())))


def decode_body(body, content_encoding: str | None, limit: int, reserve=None) -> bytes:
    """Undo ``Content-Encoding`` gzip/deflate, never inflating past ``limit`` bytes;
    ``reserve(n, what)`` is called for every step of inflated bytes before it is made. A
    truncated stream, or bytes after its end (a second gzip member included), is refused."""
    enc = (content_encoding or "identity").strip().lower()
    if enc == "identity":
        return body
    if enc not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {enc!r} is not supported (gzip, deflate or none)")
    d = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
    parts, size, data = [], 0, bytes(body)
    try:
        while data and not d.eof:
            if reserve is not None:
                reserve(INFLATE_STEP, "the inflated body")
            part = d.decompress(data, INFLATE_STEP)
            size += len(part)
            if size > limit:
                raise PayloadTooLarge(f"the decompressed body is over the {limit:,}-byte limit")
            parts.append(part)
            data = d.unconsumed_tail
    except zlib.error as e:
        raise BadRequest(f"the {enc} body does not decompress: {e}") from None
    if not d.eof:
        raise BadRequest(f"the {enc} body is truncated (its stream does not end)")
    if d.unused_data:
        raise BadRequest(f"the {enc} body has {len(d.unused_data)} bytes after its stream ends "
                         "(a second gzip member is not supported)")
    return b"".join(parts)


def json_object(text) -> dict:
    """The request's JSON object (NaN and Infinity are not JSON; nesting is bounded)."""
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"the request is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise BadRequest("the request must be a JSON object")
    return doc


def _object(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be an object")
    return value


def _flag(params: dict, key: str, what: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{what}{key} must be true or false, not {type(value).__name__}")
    return value


def _split(body, header_length: str | None):
    """The JSON header and the binary part of a body."""
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.isdigit():
        raise BadRequest(f"Inference-Header-Content-Length {header_length[:40]!r} is not a number")
    n = int(header_length)
    if not 0 < n <= len(body):
        raise BadRequest(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
    view = memoryview(body)
    return view[:n], view[n:]


def parse_infer_request(body, header_length: str | None, model_inputs: dict[str, bool],
                        model_outputs, target: tuple[str | None, str | None] = (None, None)) -> InferRequest:
    """Parse and validate one inference request.

    ``model_inputs`` maps each input the model takes to whether it must be given (an input
    with a default may be left out); ``model_outputs`` holds the output names; ``target``
    is the (model, version) of the URL, which the body's ``model_name`` and
    ``model_version`` (sent by the KServe SDK) must match. Item shapes are checked by the
    engine, which also takes the same values arranged otherwise.
    """
    head, binary = _split(body, header_length)
    req = json_object(head)
    unknown = set(req) - {"id", "inputs", "outputs", "parameters", "model_name", "model_version"}
    if unknown:
        raise BadRequest(f"unknown request field(s) {sorted(unknown)}")
    for key, expected in zip(("model_name", "model_version"), target):
        value = req.get(key)
        if value is not None and expected is not None and value != expected:
            raise BadRequest(f"{key} {str(value)[:64]!r} in the body is not {expected!r} of the URL")
    params = _object(req.get("parameters"), "parameters")
    bad = set(params) - REQUEST_PARAMETERS
    if bad:
        raise BadRequest(f"request parameter(s) {sorted(bad)} are not supported by this server "
                         f"(supported: {sorted(REQUEST_PARAMETERS)})")
    binary_output = _flag(params, "binary_data_output", "")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest("id must be a string")
    inputs = _parse_inputs(req.get("inputs"), binary, model_inputs)
    layout = None
    if len(binary) and all(a.base is not None and a.dtype.isnative for a in inputs.values()) \
            and all("data" not in t for t in req["inputs"]):
        offsets = itertools.accumulate([0] + [a.nbytes for a in inputs.values()])
        layout = tuple((k, a.dtype, a.shape, o) for (k, a), o in zip(inputs.items(), offsets))
    return InferRequest(rid, inputs, _parse_outputs(req.get("outputs"), model_outputs), binary_output, layout)


class HeaderCache:
    """Binary requests' headers parsed once: a client that sends the same JSON header (the
    same shapes and outputs, no id) again gets its tensors as views of the new body at
    the offsets found the first time. At most ``size`` headers are kept, each at most
    ``longest`` bytes; a body that does not fit the layout is parsed in full."""

    def __init__(self, size: int = 256, longest: int = 4096):
        self.size, self.longest = size, longest
        self._layouts: dict = {}

    def parse(self, body, header_length: str | None, model_inputs: dict[str, bool], model_outputs,
              target: tuple[str | None, str | None] = (None, None)) -> InferRequest:
        if header_length is None or not header_length.isdigit() or int(header_length) > self.longest:
            return parse_infer_request(body, header_length, model_inputs, model_outputs, target)
        n = int(header_length)
        key = (target, bytes(body[:n]))
        hit = self._layouts.get(key)
        if hit is not None and len(body) - n == hit[1]:
            req, binary = hit[0], memoryview(body)[n:]
            inputs = {name: np.frombuffer(binary, dtype, shape_size(shape), offset).reshape(shape)
                      for name, dtype, shape, offset in req.layout}
            return InferRequest(None, inputs, req.outputs, req.binary_output, req.layout)
        req = parse_infer_request(body, header_length, model_inputs, model_outputs, target)
        if req.layout is not None and req.id is None and len(self._layouts) < self.size:
            self._layouts[key] = (req, len(body) - n)
        return req


def shape_size(shape) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def _parse_inputs(tensors, binary: memoryview, model_inputs: dict[str, bool]) -> dict[str, np.ndarray]:
    if not isinstance(tensors, list) or not tensors:
        raise BadRequest("inputs must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for t in tensors:
        arr, used = _parse_input(t, binary, offset, model_inputs)
        offset += used
        if t["name"] in inputs:
            raise BadRequest(f"input {t['name']!r} is given twice")
        inputs[t["name"]] = arr
    if offset != len(binary):
        raise BadRequest(f"the body has {len(binary) - offset} bytes after the inputs' binary data "
                         "(binary_data_size and the body disagree)")
    check_batch(inputs, model_inputs)
    return inputs


def check_batch(inputs: dict[str, np.ndarray], model_inputs: dict[str, bool]) -> None:
    """Every required input given, all with one batch size, not zero."""
    missing = [n for n, required in model_inputs.items() if required and n not in inputs]
    if missing:
        raise BadRequest(f"missing input(s) {missing}; the model takes {list(model_inputs)}")
    counts = {len(a) for a in inputs.values()}
    if len(counts) != 1:
        raise BadRequest(f"inputs disagree on the batch size: {sorted(counts)}")
    if counts == {0}:
        raise BadRequest("the batch is empty")


def _parse_outputs(wanted, model_outputs) -> list[tuple[str, bool]]:
    if wanted is None:
        return []
    if not isinstance(wanted, list):
        raise BadRequest("outputs must be a list")
    outputs = []
    for o in wanted:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise BadRequest("each requested output needs a name")
        if o["name"] not in model_outputs:
            raise BadRequest(f"unknown output {o['name'][:128]!r}; the model has {list(model_outputs)}")
        oparams = _object(o.get("parameters"), f"output {o['name']!r}: parameters")
        bad = set(oparams) - OUTPUT_PARAMETERS
        if bad:
            raise BadRequest(f"output parameter(s) {sorted(bad)} are not supported by this server "
                             f"(supported: {sorted(OUTPUT_PARAMETERS)})")
        outputs.append((o["name"], _flag(oparams, "binary_data", f"output {o['name']!r}: ")))
    return outputs


def check_shape(name: str, shape) -> int:
    """The element count of a request's shape, refused unless it is a list of 1 to
    MAX_DIMS non-negative integers (not booleans) whose product fits the data."""
    if not isinstance(shape, list) or not 0 < len(shape) <= MAX_DIMS \
            or not all(type(d) is int and d >= 0 for d in shape):
        raise BadRequest(f"input {name!r}: shape must be a list of 1 to {MAX_DIMS} non-negative integers, "
                         "batch first")
    count = 1
    for d in shape:
        count *= d
    if count >= 1 << 62:
        raise BadRequest(f"input {name!r}: shape {shape[:8]} has too many elements")
    return count


def _parse_input(t, binary: memoryview, offset: int, model_inputs: dict) -> tuple[np.ndarray, int]:
    if not isinstance(t, dict):
        raise BadRequest("each input must be an object")
    name, datatype = t.get("name"), t.get("datatype")
    if not isinstance(name, str):
        raise BadRequest("each input needs a name")
    if name not in model_inputs:
        raise BadRequest(f"unknown input {name[:128]!r}; the model takes {list(model_inputs)}")
    count = check_shape(name, t.get("shape"))
    shape = t["shape"]
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise BadRequest(f"input {name!r}: datatype {str(datatype)[:32]!r} is not supported "
                         f"(one of {', '.join(DATATYPES)})")
    params = _object(t.get("parameters"), f"input {name!r}: parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in t:
            raise BadRequest(f"input {name!r}: both data and binary_data_size")
        itemsize = np.dtype(DATATYPES[datatype]).itemsize
        if type(size) is not int or size != count * itemsize:
            raise BadRequest(f"input {name!r}: binary_data_size {str(size)[:32]} is not {count} x "
                             f"{itemsize} bytes for shape {shape} {datatype}")
        if offset + size > len(binary):
            raise BadRequest(f"input {name!r}: the body ends {offset + size - len(binary)} bytes short "
                             "of its binary data (truncated request)")
        return tensor_from_raw(name, datatype, shape, count, binary[offset:offset + size]), size
    if "data" not in t:
        raise BadRequest(f"input {name!r}: no data (give data, or binary_data_size with binary data)")
    try:
        raw = np.asarray(t["data"])
    except (ValueError, TypeError) as e:
        raise BadRequest(f"input {name!r}: data is not a rectangular array of numbers "
                         f"({str(e).splitlines()[0][:120]})") from None
    return tensor_from_values(name, raw, shape, count, datatype), 0


def tensor_from_raw(name: str, datatype: str, shape: list, count: int, raw) -> np.ndarray:
    """A tensor viewing ``raw``'s little-endian bytes (no copy on a little-endian host)."""
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise BadRequest(f"input {name!r}: {len(raw)} bytes of data for shape {shape} {datatype} "
                         f"({count * dtype.itemsize} bytes)")
    arr = np.frombuffer(raw, dtype=dtype)
    if not dtype.isnative:
        arr = arr.astype(dtype.newbyteorder("="))
    return arr.reshape(shape)


def tensor_from_values(name: str, raw: np.ndarray, shape: list, count: int, datatype: str) -> np.ndarray:
    """A tensor of ``datatype`` from values given as numbers (JSON data, gRPC contents)."""
    dtype = np.dtype(DATATYPES[datatype])
    if raw.size != count:
        raise BadRequest(f"input {name!r}: {raw.size} values for shape {shape} ({count} values)")
    if raw.dtype.kind not in "iuf":
        what = "booleans" if raw.dtype.kind == "b" else "text or objects"
        raise BadRequest(f"input {name!r}: data must be numbers, not {what}")
    if dtype.kind in "iu":
        if raw.dtype.kind == "f" and not np.array_equal(raw, np.trunc(raw)):
            raise BadRequest(f"input {name!r}: {datatype} data has fractions")
        info = np.iinfo(dtype)
        if raw.size and (raw.min() < info.min or raw.max() > info.max):
            raise BadRequest(f"input {name!r}: values outside {datatype}'s range {info.min}..{info.max}")
    elif raw.size and not np.isfinite(raw).all():
        raise BadRequest(f"input {name!r}: data holds values beyond {datatype}'s range")
    return raw.astype(dtype).reshape(shape)


def infer_response(model: str, version: str, req: InferRequest,
                   outputs: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    wanted = req.outputs or [(name, req.binary_output) for name in outputs]
    head, blobs = [], []
    for name, binary in wanted:
        a = np.ascontiguousarray(outputs[name])
        dt = DATATYPE_OF.get(a.dtype)
        if dt is None:
            raise ServerError(f"output {name!r} has dtype {a.dtype}, which v2 cannot carry")
        t = {"name": name, "datatype": dt, "shape": list(a.shape)}
        if binary:
            b = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
            t["parameters"] = {"binary_data_size": len(b)}
            blobs.append(b)
        else:
            t["data"] = a.reshape(-1) if a.dtype != np.float16 else a.reshape(-1).astype(np.float32)
        head.append(t)
    doc = {"model_name": model, "model_version": version, "outputs": head}
    if req.id is not None:
        doc["id"] = req.id
    text = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)
