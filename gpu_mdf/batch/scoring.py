"""What a graph's output is, and how a job scores it: never a classifier by accident.

The scored output (``--output NAME``; by default the first whose declared shape is
``(N, C)`` with C >= 2, else the first) is read over the whole job, then named by what
its values are:

========================  ==========================================  =====================
values                    kind                                        predictions.csv
========================  ==========================================  =====================
(N, C>=2), rows sum to 1  ``probabilities``                           predicted, probability
(N, C>=2), outside [0,1]  ``logits``: softmax applied (auto, yes)     predicted, probability
                          ``scores`` with ``--softmax no``            predicted, score
(N, C>=2), in [0, 1]      ``sigmoid scores`` (independent per class;  predicted, score
                          ``--softmax yes`` makes them probabilities)
(N, 1) or (N,), in [0,1]  ``sigmoid``: the probability of class 1     value, predicted, probability
(N, 1) or (N,), other     ``value`` (a score or a regression)         value
anything else             ``array`` (images, sequences...)            (outputs/NAME.npy only)
========================  ==========================================  =====================

Accuracy is computed only for a kind that predicts classes, and only when every label
(a negative label means unknown) is one of its classes: labels up to 9 against a
one-column output give no accuracy, and say why.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError

SOFTMAX_MODES = ("auto", "yes", "no")
_SUM_TOLERANCE = 1e-3


def choose_output(prog, requested: str | None) -> int:
    """The index of the scored output: ``requested`` by its name or by its node's (the
    Keras layer's name: ``digit`` for ``digit_out``), else the first declared as
    ``(N, C)`` with C >= 2, else the first."""
    names = [o.name for o in prog.outputs]
    if requested is not None:
        nodes = [o.node for o in prog.outputs]
        if requested in names:
            return names.index(requested)
        if nodes.count(requested) == 1:
            return nodes.index(requested)
        close = difflib.get_close_matches(requested, names, n=1)
        raise DataError(f"--output {requested}: the graph has no such output (it has {', '.join(names)})"
                        + (f"; did you mean {close[0]}?" if close else ""))
    for k, o in enumerate(prog.outputs):
        if o.shape is not None and len(o.shape) == 2 and o.shape[1] >= 2:
            return k
    return 0


@dataclass
class Stats:
    """What the scored output's valid rows hold, gathered chunk by chunk."""

    item_shape: tuple | None = None
    rows: int = 0
    low: float = np.inf
    high: float = -np.inf
    worst_sum: float = 0.0            # the largest |row sum - 1|

    def add(self, a: np.ndarray) -> None:
        flat = a.reshape(len(a), -1).astype(np.float64, copy=False)
        valid = flat[~np.isnan(flat).any(axis=1)]
        if not len(valid):
            return
        self.item_shape = self.item_shape or tuple(a.shape[1:])
        self.rows += len(valid)
        self.low, self.high = min(self.low, float(valid.min())), max(self.high, float(valid.max()))
        self.worst_sum = max(self.worst_sum, float(np.abs(valid.sum(axis=1) - 1).max()))


@dataclass(frozen=True)
class Reading:
    """How the scored output is read: its kind, whether softmax is applied, what its
    predictions.csv column holds, and the one line that says so."""

    kind: str
    classes: int | None = None        # a kind that predicts classes: how many
    softmax: bool = False
    column: str | None = None         # "probability" | "score" | None
    note: str = ""
    one_column: bool = False

    @property
    def probabilities(self) -> bool:
        """Whether the scored values are class probabilities (probabilities.npy, confidence)."""
        return self.column == "probability"


def read_as(stats: Stats, name: str, softmax: str) -> Reading:
    """The :class:`Reading` of output ``name`` from its ``stats`` and ``--softmax``."""
    shape = stats.item_shape
    if shape is None:
        return Reading("array", note=f"output {name}: no valid item to read")
    in_unit = stats.low >= 0 and stats.high <= 1
    if shape in ((), (1,)):
        if not in_unit:
            return Reading("value", one_column=True,
                           note=f"output {name} has one value an item (a score or a regression), "
                                f"not class probabilities")
        return Reading("sigmoid", classes=2, column="probability", one_column=True,
                       note=f"output {name} has one value an item in [0, 1]: read as the probability of "
                            f"class 1 (predicted 1 from 0.5)")
    if len(shape) != 1:
        return Reading("array", note=f"output {name} is {shape} an item: written as it is, not scored")
    c = shape[0]
    if in_unit and stats.worst_sum <= _SUM_TOLERANCE:
        return Reading("probabilities", c, column="probability", note=f"output {name}: class probabilities")
    if softmax == "yes" or (softmax == "auto" and not in_unit):
        why = "logits" if not in_unit else "scores in [0, 1]"
        return Reading("logits" if not in_unit else "sigmoid scores", c, softmax=True, column="probability",
                       note=f"output {name} is not a distribution ({why}, values {stats.low:.3g} to "
                            f"{stats.high:.3g}): softmax applied")
    if in_unit:
        return Reading("sigmoid scores", c, column="score",
                       note=f"output {name}: scores in [0, 1] that do not sum to 1 (independent, sigmoid): "
                            f"not a distribution; --softmax yes normalises them")
    return Reading("scores", c, column="score",
                   note=f"output {name}: scores, not probabilities (values {stats.low:.3g} to {stats.high:.3g}; "
                        f"--softmax no)")


def softmax(a: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``a`` (n, c), in float64; NaN rows (skipped items) stay NaN."""
    z = a.astype(np.float64)
    valid = ~np.isnan(z).any(axis=1)
    out = np.full(z.shape, np.nan)
    e = np.exp(z[valid] - z[valid].max(axis=1, keepdims=True))
    out[valid] = e / e.sum(axis=1, keepdims=True)
    return out


@dataclass
class Scored:
    """One chunk of the scored output, read: the predicted class (-1 for a skipped item)
    and its probability or score, the values to write, and the top classes."""

    values: np.ndarray                # what the reading gives (probabilities after softmax...)
    valid: np.ndarray
    predicted: np.ndarray | None = None
    confidence: np.ndarray | None = None
    top: np.ndarray | None = None


def score(reading: Reading, a: np.ndarray, top_k: int) -> Scored:
    """Read one chunk of the scored output ``a`` as ``reading`` says."""
    flat = a.reshape(len(a), -1)
    valid = ~np.isnan(flat.astype(np.float64, copy=False)).any(axis=1)
    if reading.classes is None:
        return Scored(flat if reading.one_column else a, valid)
    if reading.one_column:
        p = flat[:, 0].astype(np.float64)
        predicted = np.where(valid, (np.nan_to_num(p) >= 0.5).astype(np.int64), -1)
        return Scored(flat, valid, predicted, np.where(valid, np.maximum(p, 1 - p), np.nan))
    values = softmax(flat) if reading.softmax else flat
    safe = np.nan_to_num(values.astype(np.float64), nan=-np.inf)
    predicted = np.where(valid, np.argmax(safe, axis=1), -1)
    confidence = np.where(valid, safe.max(axis=1), np.nan)
    top = np.argsort(-safe, axis=1, kind="stable")[:, :top_k] if top_k else None
    return Scored(values, valid, predicted, confidence, top)


@dataclass
class Accuracy:
    """The confusion matrix of a class-predicting reading over the labelled items, or
    why there is none: labels that are not classes of the output (a one-column output
    against digits), or predictions that are mostly not labels (an output of 784 values
    an item read as 784 classes)."""

    classes: int
    labels: np.ndarray                # every label of the data (negative: unknown)
    confusion: np.ndarray = field(init=False)
    counted: int = 0
    beyond: int = 0                   # counted items predicted as a class no label has

    def __post_init__(self):
        self.confusion = np.zeros((self.classes, self.classes), np.int64)
        self.top_label = int(self.labels.max(initial=-1))
        self.outside = int((self.labels >= self.classes).sum())

    def add(self, lo: int, scored: Scored) -> None:
        truth = self.labels[lo:lo + len(scored.valid)]
        counted = (truth >= 0) & scored.valid & (truth < self.classes)
        self.counted += int(counted.sum())
        self.beyond += int((counted & (scored.predicted > self.top_label)).sum())
        np.add.at(self.confusion, (truth[counted], scored.predicted[counted]), 1)

    def metrics(self, name: str) -> dict:
        """Accuracy, confusion matrix and per-class precision and recall; or the reason
        there is no accuracy."""
        if self.outside:
            return {"accuracy": None, "accuracy_note": (
                f"no accuracy: labels go up to {self.top_label} and output {name} predicts {self.classes} "
                f"classes ({self.outside} labelled items outside them; --output NAME scores another output)")}
        if self.beyond * 2 > self.counted:
            return {"accuracy": None, "accuracy_note": (
                f"no accuracy: output {name} predicts a class beyond the labels (0 to {self.top_label}) for "
                f"{self.beyond} of {self.counted} items: not a classifier of these labels")}
        total = int(self.confusion.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.diag(self.confusion) / self.confusion.sum(axis=0)
            recall = np.diag(self.confusion) / self.confusion.sum(axis=1)
        return {"accuracy": float(np.trace(self.confusion) / total) if total else None,
                "labelled": total, "confusion_matrix": self.confusion.tolist(),
                "per_class": {str(k): {"precision": None if np.isnan(precision[k]) else float(precision[k]),
                                       "recall": None if np.isnan(recall[k]) else float(recall[k]),
                                       "support": int(self.confusion[k].sum())} for k in range(self.classes)}}
