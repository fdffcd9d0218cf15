"""One fused op on special values (NaN, infinities, signed zeros, extremes), for the tests
that hold each form of the fused ops (generated C, compiled CPU) to NumPy's."""

import numpy as np

from gpu_mdf.engine.ops.fusion import FUSIBLE, Instr

SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, -1e-30, 3.0, -3.0, 88.0, -88.0, 1e30, -1e30, 0.5])
ATTRS = {"onnx::LeakyRelu": (("alpha", 0.1),), "onnx::Clip": (("min", -1.0), ("max", 2.0))}


def case(op: str, dtype):
    """(program, operands): ``op`` alone over SPECIAL and, for a binary op, SPECIAL rolled
    (CapAt's constant is never NaN: 1.5 there; zeros of the second operand made 2)."""
    a = SPECIAL.astype(dtype)
    b = np.roll(SPECIAL, 3).astype(dtype)
    b[b == 0] = 2.0
    if op == "gpu_mdf::CapAt":
        b = np.full_like(a, 1.5)
    program = (Instr(op, 0, 1 if FUSIBLE[op].arity == 2 else None, ATTRS.get(op, ())),)
    return program, [a, b][:FUSIBLE[op].arity]
