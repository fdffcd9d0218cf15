"""Golden outputs: every MDF file of the corpus gives the outputs recorded for it (the
graph as written: ``optimize=False``; tests/test_passes.py holds the optimised programs to
these same outputs within float rounding).

``scripts/make_golden.py`` wrote the corpus (``tests/golden/``): the examples, the
converter's cases, ONNX imports and hand-written MDF, each with its inputs, bound
constants and the engine's outputs on the CPU with single-threaded BLAS. On a machine
whose NumPy and BLAS match the recorded fingerprint the outputs must be the same bits;
elsewhere (another BLAS kernel rounds a product differently) within float32 rounding.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from golden_corpus import CASES, GOLDEN, load
from threadpoolctl import threadpool_limits

from gpu_mdf.engine import compile


def _same_machine() -> bool:
    import sys
    sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
    from make_golden import fingerprint
    recorded = json.loads((GOLDEN / "fingerprint.json").read_text())
    return {k: recorded.get(k) for k in fingerprint()} == fingerprint()


SAME_MACHINE = _same_machine()


def test_corpus_is_complete():
    assert len(CASES) == json.loads((GOLDEN / "fingerprint.json").read_text())["cases"] >= 100


@pytest.mark.parametrize("name", CASES)
def test_golden_outputs(name):
    path, feeds, consts, want = load(name)
    prog = compile(path, device="cpu", constants=consts, optimize=False)
    with threadpool_limits(1, user_api="blas"):
        got = prog.run(feeds or None)
    got = got if isinstance(got, dict) else {prog.outputs[0].name: got}
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        g = np.asarray(got[k])
        assert g.dtype == w.dtype and g.shape == w.shape, (k, g.dtype, g.shape, w.dtype, w.shape)
        if SAME_MACHINE:
            np.testing.assert_array_equal(g, w, err_msg=f"{name} output {k} changed")
        else:
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(w).max())))
