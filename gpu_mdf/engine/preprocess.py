"""The engine's preprocessing: pixel normalisation and input checks, on any array module.

Written once against ``xp`` (numpy or cupy): integer pixels are normalised on the
device (where the batch already is), float input is checked for NaN/Inf where it
lives. Also here: how a batch arranged otherwise (``(N, 784)`` for a 28x28 model, a
missing size-1 channel axis) is fitted to the layout a graph input declares, and which
items of a result are not finite.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from ..mdf import NORMALIZATIONS


# --------------------------------------------------------------------------- #
# Normalisation, written against an array module ``xp`` (numpy or cupy)
# --------------------------------------------------------------------------- #
def normalize(x, mode: str = "l2", xp=np, dtype=np.float32):
    """Normalise a batch of images ``(N, H, W)`` to float.

    * ``l2``: ``keras.utils.normalize(x, axis=1)``, the seed's choice: each column
      of each image divided by its L2 norm over the rows (zero norms left as 1);
    * ``scale``: ``x / 255``;
    * ``none``: cast only.

    A type narrower than float32 (float16) gets float32's result, rounded once: a column's
    sum of squared pixels (up to 28 x 255^2) overflows float16.
    """
    if mode not in NORMALIZATIONS:
        raise DataError(f"unknown normalisation {mode!r}; expected one of {NORMALIZATIONS}")
    if np.dtype(dtype).itemsize < 4:
        return normalize(x, mode, xp, np.float32).astype(dtype)
    x_in = x
    x = x.astype(dtype, copy=False)
    if mode == "scale":
        k = np.dtype(dtype).type(1.0 / 255.0)
        if x is not x_in:
            x *= k
            return x
        return x * k
    if mode == "none":
        return x
    if x.ndim < 2:
        raise DataError(f"l2 normalisation needs images of 2+ axes, got shape {x.shape}")
    if x.ndim == 3:  # (N, H, W): einsum avoids the x*x temporary, 2.8x faster, same bits
        norm = xp.sqrt(xp.einsum("nij,nij->nj", x, x))[:, None, :]
    else:
        norm = xp.sqrt((x * x).sum(axis=1, keepdims=True))
    norm = xp.where(norm == 0, norm.dtype.type(1), norm)   # zero norms left as 1 (no mask assignment: sync-free)
    if x is not x_in:      # x is our own float copy: divide in place
        x /= norm
        return x
    return x / norm


def check_finite(x, xp=np, what: str = "input", offset: int = 0) -> None:
    """Refuse NaN/Inf in float input, naming the first bad item (numbered from ``offset``).

    Fast path: one BLAS product ``rows @ ones`` (a NaN or Inf anywhere in a row makes
    that row's sum non-finite), 3x cheaper than ``isfinite(x).all()``; flagged rows
    are then checked exactly, so a finite row whose sum overflows is not refused.
    """
    if not xp.issubdtype(x.dtype, xp.floating) or x.size == 0:
        return
    if xp is np and x.size <= 65536 and np.isfinite(x).all():
        return                           # a small batch (a served request): one pass, no BLAS set-up
    flat = x.reshape(len(x), -1)
    with np.errstate(over="ignore", invalid="ignore"):        # an overflowing sum is checked exactly below
        sums = flat @ xp.ones(flat.shape[1], dtype=flat.dtype)
    suspect = ~xp.isfinite(sums)
    if not bool(suspect.any()):
        return
    rows = xp.nonzero(suspect)[0]
    bad = ~xp.isfinite(flat[rows]).all(axis=1)
    if bool(bad.any()):
        i = int(rows[int(xp.argmax(bad))])
        raise DataError(f"{what}: item {offset + i} holds NaN or Inf values")


def fit_layout(x, name: str, declared: tuple | None):
    """``x`` (a batch, items first) in the layout a graph input declares (``declared``:
    its shape, -1 for free axes), or None when it already has it or cannot be told. The
    same values arranged otherwise are accepted: up to size-1 axes (a channel axis), or the
    same number of values an item (``(N, 784)`` for a model taking 28x28 images)."""
    if declared is None or x.ndim == 0:
        return None
    want = tuple(declared[1:])
    if tuple(x.shape[1:]) == want or (-1 in want):
        return None
    same_dims = [d for d in x.shape[1:] if d != 1] == [d for d in want if d != 1]
    if not same_dims and int(np.prod(x.shape[1:])) != int(np.prod(want)):
        raise DataError(f"input {name}: got shape {tuple(x.shape)}, the model expects "
                        "(N, " + ", ".join(str(d) for d in want) + f") ({int(np.prod(want))} values an item)")
    return x.reshape((len(x),) + want)


def nonfinite_items(outputs: dict) -> np.ndarray | None:
    """The items (rows) holding NaN or Inf in any float output, as a bool mask over the
    batch; None when every item is finite (the common case: one check per output)."""
    bad = None
    for a in outputs.values():
        a = np.asarray(a)
        if a.dtype.kind not in "fc" or a.ndim == 0 or np.isfinite(a).all():
            continue
        rows = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
        bad = rows if bad is None else bad | rows
    return bad
