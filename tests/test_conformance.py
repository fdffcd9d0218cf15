"""ONNX's own conformance suite through MDF: zero wrong answers, zero crashes.

Every node test of the installed onnx wheel and its two PyTorch model-test folders go
ONNX -> MDF -> gpu-mdf and are compared with the suite's expected outputs at the suite's
tolerances, dtype and shape included (scripts/conformance.py). A case may pass or be
refused with a one-line reason; a wrong number or a crash fails here. The pass rate is
counted over the frozen list of node cases whose ops the engine claims and whose tensors
NumPy computes in (tests/conformance_node_cases.txt, onnx 1.23.2).
"""

import sys
from pathlib import Path

import pytest

pytest.importorskip("onnx")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import conformance as C  # noqa: E402

# onnx_to_mdf writes a TENSOR attribute as a plain list: an int32 ConstantOfShape value
# comes back int64. The information is gone from the file (gpu-mdf's importer keeps it).
ONNX_TO_MDF_LOSSES = {"test_constantofshape_int_zeros", "test_constantofshape_int_shape_zero"}
# the refusals expected, by the reason's words: inference only
REFUSAL_CLASSES = ("training mode", "training_mode=1")


@pytest.fixture(scope="module")
def cases():
    return C.load_cases()


@pytest.fixture(scope="module")
def outcomes(cases):
    return {c.name: C.run_case(c, "gpu-mdf") for c in cases}


def _lines(outs):
    return "\n".join(f"{o.kind} {o.case}: {o.detail}" for o in outs)


def test_no_wrong_answer_and_no_crash(outcomes):
    bad = [o for o in outcomes.values() if o.kind in ("wrong", "crash", "importer")]
    assert not bad, _lines(bad)


def test_pass_rate_over_the_frozen_node_cases(outcomes):
    import onnx
    version, names = C.frozen_names()
    if onnx.__version__ != version:
        pytest.skip(f"the list was frozen with onnx {version}; onnx {onnx.__version__} is installed")
    counted = {n for n in names}
    now = {c.case for c in outcomes.values() if c.suite == "node" and c.kind in ("pass", "refused", "wrong", "crash")}
    assert now == counted, (sorted(now - counted)[:10], sorted(counted - now)[:10])
    passed = sum(outcomes[n].kind == "pass" for n in names)
    assert passed / len(names) >= 0.97, f"{passed} of {len(names)}"


def test_every_refusal_is_one_line_of_an_expected_class(outcomes):
    refused = [o for o in outcomes.values() if o.kind == "refused"]
    odd = [o for o in refused if "\n" in o.detail or not any(r in o.detail for r in REFUSAL_CLASSES)]
    assert not odd, _lines(odd)


def test_every_pytorch_model_test_passes_or_is_refused_by_name(outcomes):
    models = [o for o in outcomes.values() if o.suite != "node"]
    assert len(models) == 117
    assert all(o.kind in ("pass", "refused") for o in models), _lines(o for o in models if o.kind != "pass")


def test_passing_cases_make_no_unplanned_sync_on_the_strict_standin(cases, outcomes):
    """Every case fed per batch: no device->host copy besides the ones the plan names
    (a shape, axes or sizes input fed per batch)."""
    from gpu_mdf.engine import standin
    from gpu_mdf.errors import GpuMdfError
    if standin.c_compiler() is None:
        pytest.skip("no C compiler (cc, gcc or clang): the CuPy stand-in runs generated CUDA C on the host")
    extra, refused = {}, {}
    for c in cases:
        if outcomes[c.name].kind == "pass":
            try:
                syncs = C.run_standin(c)
            except GpuMdfError as e:
                refused[c.name] = str(e)
                continue
            if syncs:
                extra[c.name] = syncs
    assert not extra, extra
    # CuPy has no multiply.at: a scatter that multiplies (duplicates would be lost) is refused on a GPU
    assert all("reduction 'mul' is not available on the GPU" in why for why in refused.values()), refused
    assert len(refused) <= 2, refused


def test_onnx_to_mdf_route_wrong_only_where_its_file_lost_the_type(cases):
    pytest.importorskip("modeci_mdf")
    outs = [C.run_case(c, "onnx_to_mdf") for c in cases]
    assert not [o for o in outs if o.kind == "crash"], _lines(o for o in outs if o.kind == "crash")
    wrong = {o.case for o in outs if o.kind == "wrong"}
    assert wrong <= ONNX_TO_MDF_LOSSES, _lines(o for o in outs if o.case in wrong - ONNX_TO_MDF_LOSSES)
    assert sum(o.kind == "pass" for o in outs) >= 1000
