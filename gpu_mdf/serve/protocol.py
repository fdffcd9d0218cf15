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

import json
import zlib
from dataclasses import dataclass, field

import numpy as np

from .errors import BadRequest, PayloadTooLarge, ServerError, UnsupportedMediaType

# v2 datatypes this server takes (BYTES, BOOL and BF16 are not pixel data)
DATATYPES = {"UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
             "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
DATATYPE_OF = {np.dtype(v): k for k, v in DATATYPES.items()}
# request-level parameters understood; any other is refused rather than ignored
REQUEST_PARAMETERS = {"binary_data_output"}
OUTPUT_PARAMETERS = {"binary_data"}


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]                          # by input name, batch axis first
    outputs: list[tuple[str, bool]] = field(default_factory=list)   # (name, binary); [] = all
    binary_output: bool = False                              # the request's binary_data_output

    @property
    def items(self) -> int:
        return len(next(iter(self.inputs.values())))


def decode_body(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding`` gzip/deflate, never inflating past ``limit`` bytes."""
    enc = (content_encoding or "identity").strip().lower()
    if enc == "identity":
        return body
    if enc not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {enc!r} is not supported (gzip, deflate or none)")
    d = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise BadRequest(f"the {enc} body does not decompress: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLarge(f"the decompressed body is over the {limit:,}-byte limit")
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def json_object(text: bytes) -> dict:
    """The request's JSON object (NaN and Infinity are not JSON)."""
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except ValueError as e:           # UnicodeDecodeError included
        raise BadRequest(f"the request is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest("the request must be a JSON object")
    return doc


def parse_infer_request(body: bytes, header_length: str | None, model_inputs: dict[str, bool],
                        model_outputs: list[str]) -> InferRequest:
    """Parse and validate one inference request.

    ``model_inputs`` maps each input the model takes to whether it must be given (an input
    with a default may be left out); ``model_outputs`` lists the output names. Item shapes
    are checked by the engine, which also takes the same values arranged otherwise.
    """
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest(f"Inference-Header-Content-Length {header_length!r} is not a number") from None
        if not 0 < n <= len(body):
            raise BadRequest(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    req = json_object(head)
    unknown = set(req) - {"id", "inputs", "outputs", "parameters"}
    if unknown:
        raise BadRequest(f"unknown request field(s) {sorted(unknown)}")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("parameters must be an object")
    bad = set(params) - REQUEST_PARAMETERS
    if bad:
        raise BadRequest(f"request parameter(s) {sorted(bad)} are not supported by this server "
                            f"(supported: {sorted(REQUEST_PARAMETERS)})")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest("id must be a string")

    tensors = req.get("inputs")
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
    missing = [n for n, required in model_inputs.items() if required and n not in inputs]
    if missing:
        raise BadRequest(f"missing input(s) {missing}; the model takes {list(model_inputs)}")
    counts = {len(a) for a in inputs.values()}
    if len(counts) != 1:
        raise BadRequest(f"inputs disagree on the batch size: {sorted(counts)}")
    if counts == {0}:
        raise BadRequest("the batch is empty")

    outputs = []
    for o in req.get("outputs") or []:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise BadRequest("each requested output needs a name")
        if o["name"] not in model_outputs:
            raise BadRequest(f"unknown output {o['name']!r}; the model has {model_outputs}")
        oparams = o.get("parameters") or {}
        bad = set(oparams) - OUTPUT_PARAMETERS
        if bad:
            raise BadRequest(f"output parameter(s) {sorted(bad)} are not supported by this server "
                                f"(supported: {sorted(OUTPUT_PARAMETERS)})")
        outputs.append((o["name"], bool(oparams.get("binary_data", False))))
    return InferRequest(rid, inputs, outputs, bool(params.get("binary_data_output", False)))


def _parse_input(t, binary: memoryview, offset: int, model_inputs: dict) -> tuple[np.ndarray, int]:
    if not isinstance(t, dict):
        raise BadRequest("each input must be an object")
    name, shape, datatype = t.get("name"), t.get("shape"), t.get("datatype")
    if not isinstance(name, str):
        raise BadRequest("each input needs a name")
    if name not in model_inputs:
        raise BadRequest(f"unknown input {name!r}; the model takes {list(model_inputs)}")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise BadRequest(f"input {name!r}: shape must be a list of non-negative integers, batch first")
    if datatype not in DATATYPES:
        raise BadRequest(f"input {name!r}: datatype {datatype!r} is not supported "
                            f"(one of {', '.join(DATATYPES)})")
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    count = int(np.prod(shape))
    params = t.get("parameters") or {}
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in t:
            raise BadRequest(f"input {name!r}: both data and binary_data_size")
        if not isinstance(size, int) or size != count * dtype.itemsize:
            raise BadRequest(f"input {name!r}: binary_data_size {size} is not {count} x {dtype.itemsize} "
                                f"bytes for shape {shape} {datatype}")
        if offset + size > len(binary):
            raise BadRequest(f"input {name!r}: the body ends {offset + size - len(binary)} bytes short "
                                "of its binary data (truncated request)")
        arr = np.frombuffer(binary[offset:offset + size], dtype=dtype).astype(dtype.newbyteorder("="))
        return arr.reshape(shape), size
    if "data" not in t:
        raise BadRequest(f"input {name!r}: no data (give data, or binary_data_size with binary data)")
    try:
        raw = np.asarray(t["data"])
    except ValueError as e:
        raise BadRequest(f"input {name!r}: data is not a rectangular array of numbers ({e})") from None
    if raw.size != count:
        raise BadRequest(f"input {name!r}: {raw.size} values for shape {shape} ({count} values)")
    if raw.dtype.kind not in "iuf" or raw.dtype.kind == "b":
        what = "booleans" if raw.dtype.kind == "b" else "text"
        raise BadRequest(f"input {name!r}: data must be numbers, not {what}")
    if dtype.kind in "iu":
        if raw.dtype.kind == "f" and not np.array_equal(raw, np.trunc(raw)):
            raise BadRequest(f"input {name!r}: {datatype} data has fractions")
        info = np.iinfo(dtype)
        if raw.size and (raw.min() < info.min or raw.max() > info.max):
            raise BadRequest(f"input {name!r}: values outside {datatype}'s range {info.min}..{info.max}")
    return raw.astype(dtype.newbyteorder("=")).reshape(shape), 0


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
            t["data"] = a.ravel().tolist()
        head.append(t)
    doc = {"model_name": model, "model_version": version, "outputs": head}
    if req.id is not None:
        doc["id"] = req.id
    text = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)
