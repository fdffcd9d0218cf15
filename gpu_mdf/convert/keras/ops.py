"""keras.ops operations called on tensors in a functional model (``x + 3.0``,
``y * (1 / 6)`` in MobileNetV3's hard sigmoid).

Their class names clash with layers (ops.numpy.Add vs layers.Add), and their arguments
mix tensors and constants, so they have translators of their own: ``operands`` are
value names, tensors and constants alike."""

from __future__ import annotations

from .registry import max2, min2, op_translator

_BINARY_OPS = {"Add": "Add", "Subtract": "Sub", "Multiply": "Mul", "Divide": "Div", "TrueDivide": "Div",
               "Power": "Pow"}


@op_translator(*_BINARY_OPS)
def _binary_op(op, b, operands):
    if len(operands) != 2:
        b.unsupported(f"{type(op).__name__} of {len(operands)} operands")
    name = type(op).__name__
    return b.op(name.lower(), f"onnx::{_BINARY_OPS[name]}", A=operands[0], B=operands[1])


@op_translator("Maximum", "Minimum")
def _max_min_op(op, b, operands):
    if len(operands) != 2:
        b.unsupported(f"{type(op).__name__} of {len(operands)} operands")
    return (max2 if type(op).__name__ == "Maximum" else min2)(b, *operands)


@op_translator("Negative")
def _negative_op(op, b, operands):
    return b.op("neg", "onnx::Neg", X=operands[0])
