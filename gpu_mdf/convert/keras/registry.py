"""The translator tables, the builder a translator writes its node with, and the helpers
the families share.

A layer translator is ``fn(layer, b, xs) -> value``: ``b`` is the :class:`NodeBuilder`
of the layer's node, ``xs`` the names of its input ports (one per input tensor); it adds
the node's parameters and functions through ``b`` and returns the name of the value that
is the layer's output (a list of them for a layer with several outputs, a
:class:`Stack` for a sequence the walker joins in a node of its own). An activation is
``fn(b, x) -> value``; a keras.ops translator ``fn(op, b, operands) -> value``. Adding a layer kind is one such
function decorated with ``@translator("ClassName")`` in the module of its family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ...errors import UnsupportedLayerError
from ...mdf import safe_id  # noqa: F401  (the translators name ids with it)

# the ONNX opset whose meaning the translators' onnx:: functions have (recorded in the file)
KERAS_OPSET = 17

TRANSLATORS: dict[str, Callable] = {}      # Keras layers, by class name
OP_TRANSLATORS: dict[str, Callable] = {}   # keras.ops operations in a functional graph (x + 3.0), by class name
ACTIVATIONS: dict[str, Callable] = {}      # activation functions, by Keras name: fn(builder, value) -> value
# Layer kinds refused with a reason (rather than "not supported"): they change what other
# layers compute in ways an unmasked MDF graph would silently ignore.
REFUSED_LAYERS = {"Masking": "masking (the masked steps would be computed like any other)"}
# In keras.activations but not usable by name (they need arguments): refused, saying so.
REFUSED_ACTIVATIONS = {"threshold": "needs its threshold and default_value arguments"}


def _registrar(table: dict):
    """A decorator factory: ``@reg("A", "B")`` files the function under each name in ``table``."""
    def register(*names: str):
        def deco(fn):
            for name in names:
                table[name] = fn
            return fn
        return deco
    return register


translator = _registrar(TRANSLATORS)         # @translator("Dense")
activation = _registrar(ACTIVATIONS)         # @activation("relu")
op_translator = _registrar(OP_TRANSLATORS)   # @op_translator("Add"): keras.ops calls


def supported_layers() -> list[str]:
    return sorted(TRANSLATORS)


@dataclass
class Stack:
    """A translator's result made of per-step values (N, 1, ...) joined along ``axis`` by
    the walker in a node of its own (modeci_mdf's EvaluableGraph gives a variadic op
    such as Concat every value of its node, so Concat gets a node that holds only it)."""
    values: list
    axis: int = 1


# --------------------------------------------------------------------------- #
# Node builder
# --------------------------------------------------------------------------- #
@dataclass
class NodeBuilder:
    """Collects one MDF node's parameters and functions with unique local ids."""

    layer: object                     # the Keras layer (or keras.ops operation) translated
    in_shapes: list[tuple]            # Keras shapes of the inputs, batch axis None
    parameters: list = field(default_factory=list)    # (id, value)
    functions: list = field(default_factory=list)     # (id, function | None, args | None, value | None)
    reserved: set = field(default_factory=set)        # ids taken already (the node's input ports)
    memo: dict = field(default_factory=dict)          # values a translator makes once per node
    call_kwargs: dict = field(default_factory=dict)   # the layer call's keyword arguments

    def _fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.reserved:
            i += 1
            name = f"{base}{i}"
        self.reserved.add(name)
        return name

    def param(self, base: str, value) -> str:
        name = self._fresh(base)
        self.parameters.append((name, value))
        return name

    def op(self, base: str, function: str, **args) -> str:
        name = self._fresh(base)
        self.functions.append((name, function, args, None))
        return name

    def expr(self, base: str, value: str) -> str:
        name = self._fresh(base)
        self.functions.append((name, None, None, value))
        return name

    def unsupported(self, what: str):
        raise UnsupportedLayerError(
            f"layer {self.layer.name!r} ({type(self.layer).__name__}): {what} is not supported")

    # layout helpers for channels-last layers
    def to_channels_first(self, x: str, rank: int) -> str:
        perm = [0, rank - 1] + list(range(1, rank - 1))
        return self.op("nchw", "onnx::Transpose", data=x, perm=perm)

    def to_channels_last(self, x: str, rank: int) -> str:
        perm = [0] + list(range(2, rank)) + [1]
        return self.op("nhwc", "onnx::Transpose", data=x, perm=perm)


# --------------------------------------------------------------------------- #
# Helpers the families share
# --------------------------------------------------------------------------- #
def weights(layer) -> dict[str, np.ndarray]:
    """The layer's weights by short name (kernel, bias, gamma...), as float32 NumPy."""
    out = {}
    for v in layer.weights:
        name = v.path.split("/")[-1] if hasattr(v, "path") else v.name.split("/")[-1].split(":")[0]
        out[name] = np.asarray(v.numpy())
    return out


def as_tuple(v, n):
    """A Keras size argument (one int for every axis, or one per axis) as an n-tuple."""
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


def _same_pads(in_sizes, kernel, strides, dilations) -> tuple[list[int], list[int]]:
    """TensorFlow 'same' padding: extra pixel at the end."""
    before, after = [], []
    for n, k, s, d in zip(in_sizes, kernel, strides, dilations):
        if n is None:
            raise UnsupportedLayerError("'same' padding needs a static spatial size")
        out = -(-n // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
        before.append(total // 2)
        after.append(total - total // 2)
    return before, after


def spatial_sizes(layer, shape, nsp: int) -> tuple:
    """The ``nsp`` spatial sizes of a layer's input ``shape``, by the layer's data_format."""
    return tuple(shape[1:1 + nsp]) if layer.data_format == "channels_last" else tuple(shape[2:2 + nsp])


def spatial_pads(layer, b, nsp, kernel, strides, dilations):
    """ONNX ``pads`` (all begins, then all ends) for a convolution or pooling layer's
    ``padding`` ('valid', TensorFlow's 'same', or 'causal')."""
    padding = layer.padding
    if padding == "valid":
        return [0] * (2 * nsp)
    if padding == "same":
        before, after = _same_pads(spatial_sizes(layer, b.in_shapes[0], nsp), kernel, strides, dilations)
        return before + after
    if padding == "causal":
        return [(kernel[0] - 1) * dilations[0]] + [0]
    b.unsupported(f"padding={padding!r}")


# Binary forms of max/min/sum: modeci_mdf's EvaluableGraph feeds *every* value of a
# node into a variadic ONNX op (Max, Min, Sum, Mean), so those are avoided.
def max2(b, a, c, name="max"):
    return b.op(name, "onnx::Where", condition=b.op(f"{name}_ge", "onnx::GreaterOrEqual", A=a, B=c), X=a, Y=c)


def min2(b, a, c, name="min"):
    return b.op(name, "onnx::Where", condition=b.op(f"{name}_ge", "onnx::GreaterOrEqual", A=c, B=a), X=a, Y=c)


def fold(b, xs, fn, name):
    """``fn(b, y, x, name)`` over the values ``xs``, left to right."""
    y = xs[0]
    for x in xs[1:]:
        y = fn(b, y, x, name)
    return y
