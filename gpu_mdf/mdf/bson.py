"""BSON (bsonspec.org, version 1.1) for MDF documents, with the weight arrays
encoded and decoded by NumPy instead of one Python object per number.

MDF's binary form is modelspec's: the document as BSON, arrays as BSON arrays
(documents keyed "0", "1", ...) of doubles. ``modeci_mdf`` reads and writes it with
pymongo's ``bson`` module, which builds a Python float for every weight: VGG16's
33.6 M weights took 4.3 s to write and 1.7 s to read that way, and 1.3 s more to
become arrays. Here a float array's bytes are laid out (or read) as a few strided
blocks per axis, one per key length ("0"-"9", "10"-"99", ...): the same bytes as
pymongo writes (a test compares them), at memory speed.

Only the types an MDF document holds are handled: documents, arrays, UTF-8 strings,
doubles, 32/64-bit integers, booleans and null. Any other type byte, a length
that does not add up, or trailing bytes is a :class:`BSONError` naming the offset.
Decoded arrays of doubles (any depth, rectangular) come back as float64 ndarrays;
every other array as a list.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np

__all__ = ["BSONError", "encode", "write", "decode"]

DOUBLE, STRING, DOC, ARRAY, BOOL, NULL, INT32, INT64 = 0x01, 0x02, 0x03, 0x04, 0x08, 0x0A, 0x10, 0x12
_I32 = struct.Struct("<i")
MAX_DOCUMENT = 2**31 - 1        # BSON sizes are signed 32-bit: a document (the whole file) stops at 2 GiB
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")


class BSONError(ValueError):
    """Bytes that are not a BSON document of the kinds MDF uses."""


# --------------------------------------------------------------------------- #
# Key-length groups: array keys "0".."9" take 1 byte, "10".."99" 2, ...
# --------------------------------------------------------------------------- #
def _groups(n: int) -> Iterator[tuple[int, int, int]]:
    """(digits, first index, count) for the indices 0..n-1."""
    lo, g = 0, 1
    while lo < n:
        hi = min(n, 10 ** g)
        yield g, lo, hi - lo
        lo, g = hi, g + 1


def _array_size(n: int, item: int) -> int:
    """Bytes of a BSON array of n elements whose values take ``item`` bytes each."""
    return 5 + sum(cnt * (g + 2 + item) for g, _, cnt in _groups(n))


def _count_for_size(size: int, item: int) -> int | None:
    """The element count n whose array is ``size`` bytes, or None."""
    n, total = 0, 5
    for g in range(1, 20):
        step = g + 2 + item
        cap = 10 ** g - n
        if total + cap * step >= size:
            rest = size - total
            return n + rest // step if rest % step == 0 else None
        n, total = n + cap, total + cap * step
    return None


def _digits(lo: int, cnt: int, g: int) -> np.ndarray:
    idx = np.arange(lo, lo + cnt, dtype=np.int64)[:, None]
    return ((idx // (10 ** np.arange(g - 1, -1, -1, dtype=np.int64))) % 10 + 48).astype(np.uint8)


def _strided(buf, dtype, offset, counts, strides) -> np.ndarray:
    return np.ndarray(counts, dtype=dtype, buffer=buf, offset=offset, strides=strides)


# --------------------------------------------------------------------------- #
# Encoding
# --------------------------------------------------------------------------- #
def _doc_size(shape: tuple) -> int:
    """Bytes of the BSON array document of a float array of ``shape``."""
    return _array_size(shape[0], 8 if len(shape) == 1 else _doc_size(shape[1:]))


def _fill(t: np.ndarray, shape: tuple) -> list:
    """Write into ``t`` (exactly ``_doc_size(shape)`` bytes) the BSON array document of a
    float array of ``shape`` with its values still unset, and return where the values go:
    (offset, counts, strides, output slices) blocks, one per key-length group and axis.
    A nested level is written once, in the first record, and copied into the others, so
    the whole costs about one pass over ``t``."""
    n, size = shape[0], t.size
    item, code = (8, DOUBLE) if len(shape) == 1 else (_doc_size(shape[1:]), ARRAY)
    t[:4] = np.frombuffer(_I32.pack(size), np.uint8)
    values, off, first, inner_values = [], 4, None, None
    for g, lo, cnt in _groups(n):
        step = g + 2 + item
        rec = t[off:off + cnt * step].reshape(cnt, step)
        rec[:, 0] = code
        rec[:, 1:1 + g] = _digits(lo, cnt, g)
        rec[:, 1 + g] = 0
        if code == DOUBLE:
            values.append((off + 2 + g, (cnt,), (step,), (slice(lo, lo + cnt),)))
        else:
            if first is None:
                first = rec[0, 2 + g:]
                inner_values = _fill(first, shape[1:])
                rec[1:, 2 + g:] = first
            else:
                rec[:, 2 + g:] = first
            values += [(off + 2 + g + o, (cnt,) + c, (step,) + st, (slice(lo, lo + cnt),) + sl)
                       for o, c, st, sl in inner_values]
        off += cnt * step
    t[off] = 0
    return values


class _FloatArray:
    """A float array's BSON document, written when its turn comes (into a scratch buffer
    that the next array reuses): bytes of the file are never all in memory at once."""

    def __init__(self, a: np.ndarray):
        self.a, self.size = a, _doc_size(a.shape)

    def write_into(self, t: np.ndarray) -> np.ndarray:
        t = t[:self.size]
        for o, counts, strides, sl in _fill(t, self.a.shape):   # doubles through strided views
            _strided(t, "<f8", o, counts, strides)[...] = self.a[sl]
        return t

    def __len__(self) -> int:
        return self.size


def _cstring(key) -> bytes:
    if not isinstance(key, str):
        raise BSONError(f"document keys are strings, not {type(key).__name__} ({key!r})")
    b = key.encode("utf-8")
    if b"\0" in b:
        raise BSONError(f"a key with a NUL character: {key!r}")
    return b + b"\0"


def _element(key: bytes, v, out: list) -> int:
    """Append one element's chunks to ``out``; return its size."""
    if isinstance(v, np.ndarray):
        if v.ndim == 0:
            v = v.item()
        elif v.dtype.kind == "f":
            if v.size == 0:
                v = v.tolist()
            else:
                doc = _FloatArray(v)
                out += [bytes([ARRAY]) + key, doc]
                return 1 + len(key) + doc.size
        elif v.dtype.kind in "biu":
            v = v.tolist()
        else:
            raise BSONError(f"an array of {v.dtype} cannot be written as MDF")
    elif isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool):
        out.append(bytes([BOOL]) + key + (b"\1" if v else b"\0"))
    elif isinstance(v, int):
        if -2 ** 31 <= v < 2 ** 31:
            out.append(bytes([INT32]) + key + _I32.pack(v))
        elif -2 ** 63 <= v < 2 ** 63:
            out.append(bytes([INT64]) + key + _I64.pack(v))
        else:
            raise BSONError(f"integer {v} does not fit in 64 bits")
    elif isinstance(v, float):
        out.append(bytes([DOUBLE]) + key + _F64.pack(v))
    elif isinstance(v, str):
        s = v.encode("utf-8")
        out.append(bytes([STRING]) + key + _I32.pack(len(s) + 1) + s + b"\0")
    elif v is None:
        out.append(bytes([NULL]) + key)
    elif isinstance(v, dict):
        head = bytes([DOC]) + key
        out.append(head)
        return len(head) + _document(v.items(), out)
    elif isinstance(v, (list, tuple)):
        head = bytes([ARRAY]) + key
        out.append(head)
        return len(head) + _document(((str(i), x) for i, x in enumerate(v)), out)
    else:
        raise BSONError(f"a {type(v).__name__} value cannot be written as MDF ({v!r:.60})")
    return len(out[-1])


def _document(items, out: list) -> int:
    at = len(out)
    out.append(b"")                       # the length, filled in below
    size = 5
    for k, v in items:
        size += _element(_cstring(k), v, out)
    if size > MAX_DOCUMENT:
        raise BSONError(f"{size:,} bytes, over BSON's limit of {MAX_DOCUMENT:,} bytes (2 GiB) for a document: "
                        f"write JSON instead")
    out[at] = _I32.pack(size)
    out.append(b"\0")
    return size


def _chunks(doc: dict) -> list:
    if not isinstance(doc, dict):
        raise BSONError(f"a BSON document is a dict, not {type(doc).__name__}")
    out: list = []
    _document(doc.items(), out)
    return out


def write(doc: dict, f) -> int:
    """Write ``doc`` as BSON to the binary file ``f``; return the bytes written. Memory
    beyond the document itself: one buffer the size of its largest float array."""
    chunks = _chunks(doc)
    scratch = np.empty(max((len(c) for c in chunks if isinstance(c, _FloatArray)), default=0), np.uint8)
    total = 0
    for c in chunks:
        f.write(memoryview(c.write_into(scratch)) if isinstance(c, _FloatArray) else c)
        total += len(c)
    return total


def encode(doc: dict) -> bytes:
    """``doc`` as BSON bytes: the same bytes as pymongo's ``bson.encode`` of the document
    with its float arrays as lists of Python floats."""
    import io
    f = io.BytesIO()
    write(doc, f)
    return f.getvalue()


# --------------------------------------------------------------------------- #
# Decoding
# --------------------------------------------------------------------------- #
class _Layout:
    """Where a rectangular array of doubles lies in a buffer, relative to the start of its
    BSON document: value blocks (offset, counts, strides, output slices) and the bytes
    that must hold given values for the layout to be right (type codes, key ends,
    nested lengths)."""

    def __init__(self, shape, size, values, checks):
        self.shape, self.size, self.values, self.checks = shape, size, values, checks


def _layout(buf, pos: int, end: int) -> _Layout | None:
    """The layout of the array document at ``pos`` if it is a rectangular array of doubles
    (any depth, at least one element), else None."""
    if pos + 5 > end:
        return None
    size = _I32.unpack_from(buf, pos)[0]
    if size <= 5 or pos + size > end:        # an empty array is a list
        return None
    first = buf[pos + 4]
    if first == DOUBLE:
        item, inner = 8, None
    elif first == ARRAY:
        at = pos + 7                       # type, key "0", NUL
        inner = _layout(buf, at, pos + size)
        if inner is None:
            return None
        item = inner.size
    else:
        return None
    n = _count_for_size(size, item)
    if n is None:
        return None
    values, checks = [], [(0, "<i4", (), (), size), (size - 1, "u1", (), (), 0)]
    off = 4
    for g, lo, cnt in _groups(n):
        step = g + 2 + item
        checks += [(off, "u1", (cnt,), (step,), first), (off + 1 + g, "u1", (cnt,), (step,), 0)]
        start = off + 2 + g
        if inner is None:
            values.append((start, (cnt,), (step,), (slice(lo, lo + cnt),)))
        else:
            values += [(start + o, (cnt,) + c, (step,) + s, (slice(lo, lo + cnt),) + sl)
                       for o, c, s, sl in inner.values]
            checks += [(start + o, d, (cnt,) + c, (step,) + s, want) for o, d, c, s, want in inner.checks]
        off += cnt * step
    shape = (n,) if inner is None else (n,) + inner.shape
    return _Layout(shape, size, values, checks)


def _float_array(buf, pos: int, end: int) -> tuple[np.ndarray, int] | None:
    lay = _layout(buf, pos, end)
    if lay is None:
        return None
    for o, dtype, counts, strides, want in lay.checks:
        if not np.all(_strided(buf, dtype, pos + o, counts, strides) == want):
            return None                    # not uniform after all: decoded one element at a time
    a = np.empty(lay.shape, np.float64)
    for o, counts, strides, sl in lay.values:
        a[sl] = _strided(buf, "<f8", pos + o, counts, strides)
    return a, pos + lay.size


def _read_document(buf, pos: int, end: int, as_list: bool):
    if pos + 5 > end:
        raise BSONError(f"offset {pos}: a document runs past the end of the data")
    size = _I32.unpack_from(buf, pos)[0]
    stop = pos + size
    if size < 5 or stop > end or buf[stop - 1] != 0:
        raise BSONError(f"offset {pos}: a document of impossible length {size}")
    out = [] if as_list else {}
    i = pos + 4
    while i < stop - 1:
        t = buf[i]
        j = buf.find(b"\0", i + 1, stop)
        if j < 0:
            raise BSONError(f"offset {i}: a key without its NUL")
        key = buf[i + 1:j].decode("utf-8")
        i = j + 1
        if t == DOUBLE:
            v = _F64.unpack_from(buf, i)[0]
            i += 8
        elif t == STRING:
            n = _I32.unpack_from(buf, i)[0]
            if n < 1 or i + 4 + n > stop or buf[i + 3 + n] != 0:
                raise BSONError(f"offset {i}: a string of impossible length {n}")
            v = buf[i + 4:i + 3 + n].decode("utf-8")
            i += 4 + n
        elif t == DOC:
            v, i = _read_document(buf, i, stop, False)
        elif t == ARRAY:
            fast = _float_array(buf, i, stop)
            v, i = fast if fast is not None else _read_document(buf, i, stop, True)
        elif t == BOOL:
            if buf[i] not in (0, 1):
                raise BSONError(f"offset {i}: a boolean of value {buf[i]}")
            v, i = bool(buf[i]), i + 1
        elif t == NULL:
            v = None
        elif t == INT32:
            v, i = _I32.unpack_from(buf, i)[0], i + 4
        elif t == INT64:
            v, i = _I64.unpack_from(buf, i)[0], i + 8
        else:
            raise BSONError(f"offset {i - len(key) - 2}: BSON type 0x{t:02x} (of {key!r}) is not used by MDF")
        if i > stop - 1:
            raise BSONError(f"offset {i}: the value of {key!r} runs past the end of its document")
        if as_list:
            out.append(v)
        else:
            out[key] = v
    return out, stop


def decode(data: bytes) -> dict:
    """A BSON document: dicts, lists, strings, numbers, booleans, None, and float64
    arrays for the arrays of doubles."""
    buf = bytes(data)
    try:
        doc, stop = _read_document(buf, 0, len(buf), False)
    except (struct.error, IndexError) as e:
        raise BSONError(f"truncated or malformed data ({e})") from None
    except UnicodeDecodeError as e:
        raise BSONError(f"a key or string that is not UTF-8 ({e.reason})") from None
    except RecursionError:
        raise BSONError("documents nested too deeply") from None
    if stop != len(buf):
        raise BSONError(f"offset {stop}: {len(buf) - stop} bytes after the document")
    return doc
