"""ONNX's own conformance suite through MDF and the gpu-mdf engine.

    python scripts/conformance.py [--route gpu-mdf|onnx_to_mdf] [--suite node pytorch-converted pytorch-operator]
                                  [--standin] [--op Softmax] [--case test_softmax] [--json out.json] [--list]

Cases: the node tests of the installed ``onnx`` wheel
(``onnx.backend.test.case.node.collect_testcases()``: one model, its inputs, the
expected outputs and their rtol/atol) and the PyTorch model tests it ships
(``onnx/backend/test/data/pytorch-converted`` and ``pytorch-operator``). Each case goes
ONNX -> MDF by a route (gpu-mdf's own importer, ``gpu_mdf.convert.onnx``, or modeci_mdf's
``onnx_to_mdf`` with its nodes named and its weights and every input after the first
bound with ``constants=``) -> ``gpu_mdf.engine.compile`` -> run, and is compared with the
suite's expected outputs at the suite's tolerances, dtype and shape included.

Outcomes: ``pass``; ``refused`` (a one-line reason: an op, attribute value, dtype or opset
the engine does not implement; a tensor type NumPy does not compute in); ``wrong`` (it ran
and the numbers, dtype or shape differ); ``crash`` (any other exception: a bug);
``importer`` (the route's own converter failed: reported apart, it is not the engine's).
``--standin`` also runs each passing case whose inputs are fed per batch on the strict
CuPy stand-in (tests/fake_cupy.py) and counts device->host syncs beyond the results.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import io
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("node", "pytorch-converted", "pytorch-operator")
# element types NumPy and CuPy compute in (ONNX TensorProto codes)
NUMERIC_TYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
                 9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64"}
TYPE_NAMES = {8: "string", 14: "complex64", 15: "complex128", 16: "bfloat16", 17: "float8e4m3fn",
              18: "float8e4m3fnuz", 19: "float8e5m2", 20: "float8e5m2fnuz", 21: "uint4", 22: "int4",
              23: "float4e2m1", 24: "float8e8m0", 25: "uint2", 26: "int2"}


@dataclass
class Case:
    name: str
    suite: str
    model: object                       # onnx.ModelProto
    data_sets: list                     # [(inputs list, outputs list)]
    rtol: float = 1e-3
    atol: float = 1e-7

    @property
    def ops(self) -> list[str]:
        return sorted({n.op_type for n in self.model.graph.node})

    @property
    def opset(self) -> int:
        return max((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), default=0)


@dataclass
class Outcome:
    case: str
    suite: str
    ops: list[str]
    opset: int
    kind: str                           # pass | refused | wrong | crash | importer | type | unclaimed
    detail: str = ""
    syncs: int | None = None            # --standin: extra device->host syncs per run
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- #
# Cases
# --------------------------------------------------------------------------- #
def node_cases() -> list[Case]:
    from onnx.backend.test.case.node import collect_testcases
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        found = collect_testcases()
    return [Case(c.name, "node", c.model, [(_arrays(i), _arrays(o)) for i, o in c.data_sets], c.rtol, c.atol)
            for c in found if c.kind == "node"]


def _arrays(values) -> list:
    """A data set's values as arrays (a few cases hold TensorProtos)."""
    from onnx import TensorProto, numpy_helper
    return [numpy_helper.to_array(v) if isinstance(v, TensorProto) else v for v in values]


def model_cases(suite: str) -> list[Case]:
    import onnx
    import onnx.backend.test as t
    root = Path(t.__file__).parent / "data" / suite
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        model = onnx.load(str(folder / "model.onnx"))
        sets = [(_tensors(ds, "input"), _tensors(ds, "output"))
                for ds in sorted(glob.glob(str(folder / "test_data_set_*")))]
        cases.append(Case(folder.name, suite, model, sets))
    return cases


def _tensors(folder: str, kind: str) -> list[np.ndarray]:
    import onnx
    from onnx import numpy_helper
    files = sorted(glob.glob(os.path.join(folder, f"{kind}_*.pb")), key=lambda p: int(p[:-3].rsplit("_")[-1]))
    return [numpy_helper.to_array(onnx.load_tensor(f)) for f in files]


def load_cases(suites=SUITES) -> list[Case]:
    out = []
    for s in suites:
        out += node_cases() if s == "node" else model_cases(s)
    return out


def type_refusal(model) -> str | None:
    """The first tensor of a type NumPy does not compute in (strings, bfloat16, float8,
    int4, complex) or that is not a tensor (sequences, maps, optionals); None if none."""
    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        t = vi.type
        kind = t.WhichOneof("value")
        if kind != "tensor_type":
            return f"{vi.name} is a {kind.replace('_type', '')}, not a tensor"
        if t.tensor_type.elem_type not in NUMERIC_TYPES:
            return f"{vi.name} is a {TYPE_NAMES.get(t.tensor_type.elem_type, t.tensor_type.elem_type)} tensor"
    for init in g.initializer:
        if init.data_type not in NUMERIC_TYPES:
            return f"initializer {init.name} is a {TYPE_NAMES.get(init.data_type, init.data_type)} tensor"
    for n in g.node:
        for a in n.attribute:
            if a.type == a.TENSOR and a.t.data_type not in NUMERIC_TYPES:
                return f"{n.op_type} attribute {a.name} is a {TYPE_NAMES.get(a.t.data_type, a.t.data_type)} tensor"
            if n.op_type in ("Cast", "CastLike") and a.name == "to" and a.i not in NUMERIC_TYPES:
                return f"Cast to {TYPE_NAMES.get(a.i, a.i)}"
    return None


def unclaimed_ops(model) -> list[str]:
    from gpu_mdf.engine import OPS
    return sorted({n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node
                   if n.domain not in ("", "ai.onnx") or f"onnx::{n.op_type}" not in OPS})


# --------------------------------------------------------------------------- #
# Routes: ONNX model -> (MDF document, constants, feeds by input name, output names)
# --------------------------------------------------------------------------- #
def route_gpu_mdf(model, inputs):
    from gpu_mdf.convert.onnx import onnx_to_mdf_doc
    doc = onnx_to_mdf_doc(model)
    from gpu_mdf.mdf import GraphMeta, mdf_graph
    meta = GraphMeta.of(mdf_graph(doc))
    feeds = dict(zip(meta.inputs, inputs))
    return doc, None, feeds, meta.outputs


def route_onnx_to_mdf(model, inputs):
    """modeci_mdf's importer as the conformance issue ran it: nodes named, weights and
    every input after the first bound as constants, the first input fed."""
    import onnx
    from modeci_mdf.interfaces.onnx.importer import id_to_port, onnx_to_mdf
    from onnx import numpy_helper
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for k, n in enumerate(m.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{k}"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            mdf = onnx_to_mdf(m)
        doc = mdf.to_dict()
    except Exception as e:
        raise ImporterFailed(f"onnx_to_mdf: {type(e).__name__}: {_line(e)}") from None
    inits = {t.name for t in m.graph.initializer}
    data_inputs = [i.name for i in m.graph.input if i.name not in inits]
    consts = {id_to_port(t.name): numpy_helper.to_array(t) for t in m.graph.initializer}
    feeds = {}
    for k, (name, x) in enumerate(zip(data_inputs, inputs)):
        if k == 0:
            feeds[id_to_port(name)] = x
        else:
            consts[id_to_port(name)] = x
    return doc, consts, feeds, [id_to_port(o.name) for o in m.graph.output]


ROUTES = {"gpu-mdf": route_gpu_mdf, "onnx_to_mdf": route_onnx_to_mdf}


class ImporterFailed(Exception):
    pass


def _line(e) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


# --------------------------------------------------------------------------- #
# Running one case
# --------------------------------------------------------------------------- #
def compare(got, want, rtol, atol) -> str | None:
    """Why ``got`` is not ``want`` (dtype, shape, values), or None."""
    got, want = np.asarray(got), np.asarray(want)
    if got.dtype != want.dtype:
        return f"dtype {got.dtype}, expected {want.dtype}"
    if got.shape != want.shape:
        return f"shape {got.shape}, expected {want.shape}"
    if want.dtype.kind in "fc":
        try:
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
        except AssertionError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if "Max absolute" in ln or "Mismatched" in ln]
            return "values differ: " + "; ".join(lines)
    elif not np.array_equal(got, want):
        return f"values differ ({int(np.sum(got != want))} of {want.size})"
    return None


def run_case(case: Case, route: str = "gpu-mdf", backend="cpu") -> Outcome:
    from gpu_mdf.errors import GpuMdfError
    out = Outcome(case.name, case.suite, case.ops, case.opset, "pass")
    why = type_refusal(case.model)
    if why:
        out.kind, out.detail = "type", why
        return out
    missing = unclaimed_ops(case.model)
    if missing:
        out.kind, out.detail = "unclaimed", f"ops not in the engine's table: {', '.join(missing)}"
        return out
    from gpu_mdf.engine import compile
    try:
        for inputs, expected in case.data_sets:
            doc, consts, feeds, names = ROUTES[route](case.model, inputs)
            prog = compile(doc, device=backend, constants=consts)
            with np.errstate(all="ignore"):
                got = prog.run(feeds, check=False)
            got = got if isinstance(got, dict) else {prog.outputs[0].name: got}
            for k, want in enumerate(expected):
                name = names[k] if names and k < len(names) else None
                if name not in got:
                    out.kind, out.detail = "wrong", f"output {k} ({name}) missing; got {sorted(got)}"
                    return out
                why = compare(got[name], want, case.rtol, case.atol)
                if why:
                    out.kind, out.detail = "wrong", f"output {k}: {why}"
                    return out
    except ImporterFailed as e:
        out.kind, out.detail = "importer", str(e)
    except GpuMdfError as e:
        text = str(e)
        out.kind, out.detail = "refused", text.splitlines()[0] if text else type(e).__name__
        if "\n" in text.strip():
            out.kind, out.detail = "crash", f"a refusal of several lines: {text[:200]!r}"
    except Exception as e:
        out.kind, out.detail = "crash", f"{type(e).__name__}: {_line(e)}"
    return out


def run_standin(case: Case, route: str = "gpu-mdf") -> int | None:
    """Device->host syncs of one run on the strict CuPy stand-in beyond those the plan
    declares (a static input fed per batch); None when nothing is fed per batch."""
    sys.path.insert(0, str(ROOT / "tests"))
    import fake_cupy

    from gpu_mdf.engine import compile
    from gpu_mdf.engine.backend import Backend
    inputs, _ = case.data_sets[0]
    doc, consts, feeds, names = ROUTES[route](case.model, inputs)
    if not feeds:
        return None
    from pytest import MonkeyPatch
    with MonkeyPatch.context() as mp:
        fake_cupy.install(mp)
        backend = Backend("cupy", fake_cupy, "gpu:0", "strict CuPy stand-in", 0)
        prog = compile(doc, device=backend, constants=consts)
        specs = {p.name: p for p in prog.inputs}
        dev = {k: prog.prepare(v, specs[k], check=False) for k, v in feeds.items()}
        with np.errstate(all="ignore"):
            prog.execute(dev)                   # warm-up: cached index arrays
            fake_cupy.COUNT.reset()
            prog.execute(dev)
        # a shape, axes or sizes input fed per batch is one planned copy each (Program.describe names them)
        return fake_cupy.COUNT.d2h_syncs - len(prog.plan.syncs)


FROZEN = ROOT / "tests" / "conformance_node_cases.txt"


def counted_node_cases(cases: list[Case]) -> list[Case]:
    """The node cases the pass rate is counted over: ops the engine claims, numeric tensors."""
    return [c for c in cases if c.suite == "node" and not type_refusal(c.model) and not unclaimed_ops(c.model)]


def freeze() -> list[str]:
    import onnx
    names = [c.name for c in counted_node_cases(node_cases())]
    FROZEN.write_text(f"# ONNX node test cases (onnx {onnx.__version__}) whose ops gpu-mdf claims and whose tensors "
                      f"NumPy computes in;\n# the conformance test counts its pass rate over exactly these "
                      f"(scripts/conformance.py --freeze rewrites it)\n" + "\n".join(names) + "\n")
    print(f"{len(names)} node cases frozen in {FROZEN}")
    return names


def frozen_names() -> tuple[str, list[str]]:
    """(the onnx version the list was frozen with, the case names)."""
    lines = FROZEN.read_text().splitlines()
    version = lines[0].split("(onnx ")[1].split(")")[0]
    return version, [ln for ln in lines if ln and not ln.startswith("#")]


# --------------------------------------------------------------------------- #
# Reports
# --------------------------------------------------------------------------- #
def table(outcomes: list[Outcome]) -> str:
    kinds = ["pass", "refused", "wrong", "crash", "importer", "type", "unclaimed"]
    by_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        for op in o.ops or ["-"]:
            by_op[op][o.kind] += 1
    lines = ["| op | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for op in sorted(by_op):
        lines.append(f"| {op} | " + " | ".join(str(by_op[op][k] or "") for k in kinds) + " |")
    return "\n".join(lines)


def totals(outcomes: list[Outcome]) -> dict:
    c = collections.Counter(o.kind for o in outcomes)
    counted = c["pass"] + c["refused"] + c["wrong"] + c["crash"]
    return {**c, "counted": counted, "pass_rate": c["pass"] / counted if counted else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--route", choices=sorted(ROUTES), default="gpu-mdf")
    ap.add_argument("--suite", nargs="*", choices=SUITES, default=list(SUITES))
    ap.add_argument("--op", action="append", help="only cases using this op")
    ap.add_argument("--case", action="append", help="only cases whose name starts with this")
    ap.add_argument("--standin", action="store_true", help="also run passing cases on the strict CuPy stand-in")
    ap.add_argument("--json", help="write every outcome here")
    ap.add_argument("--list", action="store_true", help="print every case that is not a pass")
    ap.add_argument("--table", action="store_true", help="print the per-op table (Markdown)")
    ap.add_argument("--freeze", action="store_true", help=f"rewrite {FROZEN.relative_to(ROOT)} and stop")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.freeze:
        return freeze()
    cases = load_cases(args.suite)
    if args.op:
        cases = [c for c in cases if set(args.op) & set(c.ops)]
    if args.case:
        cases = [c for c in cases if any(c.name.startswith(p) for p in args.case)]
    outcomes = []
    for c in cases:
        o = run_case(c, args.route)
        if args.standin and o.kind == "pass":
            try:
                o.syncs = run_standin(c, args.route)
            except Exception as e:
                o.kind, o.detail = "crash", f"on the stand-in: {type(e).__name__}: {_line(e)}"
        outcomes.append(o)
    if args.list:
        for o in outcomes:
            if o.kind != "pass" or (o.syncs or 0) > 0:
                print(f"{o.kind:9s} {o.suite:17s} {o.case}: {o.detail}" + (f" [syncs {o.syncs}]" if o.syncs else ""))
    if args.table:
        print(table(outcomes))
    t = totals(outcomes)
    print(json.dumps(t))
    if args.json:
        Path(args.json).write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    return outcomes


if __name__ == "__main__":
    main()
