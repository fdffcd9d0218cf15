"""The opt-in reduced precisions, ``compile(precision="fp16" | "tf32")`` and ``gpu-mdf bench
--precision``: fp16 runs every value in float16 (on NumPy here, and on the strict CuPy
stand-in, where the generated kernels, written for float32/float64, stand aside); tf32
sets cuBLAS's compute type around a GPU program's products and puts it back; both are
compared with float32, never trusted blindly; what does not fit is refused in one line."""


import numpy as np
import pytest
from golden_corpus import GOLDEN
from golden_corpus import load as _load

from gpu_mdf.engine import compile
from gpu_mdf.errors import CompileError, DataError

CASES = ["example-mnist_softmax", "keras-Conv2D-same", "keras-DepthwiseConv2D", "keras-SeparableConv2D",
         "keras-activation-softmax", "keras-BatchNormalization", "keras-rnn-LSTM", "onnx_to_mdf-mobilenet_block",
         "pytorch-style-cnn_pool", "keras-Conv2D-groups"]


def golden(name):
    return _load(name)[:3]


def as_dict(prog, out):
    return out if isinstance(out, dict) else {prog.outputs[0].name: out}


def half_feeds(feeds):
    return {k: v.astype(np.float16) if v.dtype.kind == "f" else v for k, v in feeds.items()}


def check_close_to_float32(name, prog, feeds, consts):
    ref_prog = compile(golden(name)[0], device="cpu", constants=consts)
    ref = as_dict(ref_prog, ref_prog.run(feeds))
    got = as_dict(prog, prog.run(half_feeds(feeds)))
    assert sorted(got) == sorted(ref)
    for k, r in ref.items():
        g = np.asarray(got[k])
        assert g.dtype == np.float16, (k, g.dtype)
        scale = max(1.0, float(np.abs(r).max()))
        err = float(np.abs(g.astype(np.float64) - r).max())
        # float16 keeps 11 bits: a few roundings per layer, far from float32's 1e-7 but not garbage
        assert err <= 2e-2 * scale, (name, k, err, scale)
        assert err > 0 or np.abs(r).max() == 0 or r.dtype != np.float32, "fp16 gave float32's bits: not run in half"


@pytest.mark.parametrize("name", CASES)
def test_fp16_on_numpy_stays_within_half_precision_of_float32(name):
    path, feeds, consts = golden(name)
    prog = compile(path, device="cpu", constants=consts, precision="fp16")
    assert prog.dtype == np.float16
    trace = []
    prog.execute({k: prog.prepare(v, next(p for p in prog.inputs if p.name == k))
                  for k, v in half_feeds(feeds).items()}, trace=trace)
    floats = {str(key): v.dtype for key, v in trace if getattr(v, "dtype", np.dtype("i4")).kind == "f"}
    assert floats and set(floats.values()) == {np.dtype(np.float16)}, floats
    check_close_to_float32(name, prog, feeds, consts)


@pytest.mark.parametrize("name", CASES)
def test_fp16_on_the_stand_in_uses_cupys_own_kernels(name, strict_gpu):
    """Before: ValueError from the generated kernels (written for float32/float64) at the
    first fused chain or convolution of a float16 program on a GPU."""
    import fake_cupy
    path, feeds, consts = golden(name)
    prog = compile(path, device=strict_gpu, constants=consts, precision="fp16")
    fake_cupy.COUNT.reset()
    check_close_to_float32(name, prog, feeds, consts)
    assert not [w for kind, w in fake_cupy.COUNT.log if "gpu_mdf_" in w], "a generated kernel ran in float16"


@pytest.mark.parametrize("norm", ["l2", "scale", "none"])
def test_fp16_agrees_with_float32_on_mnist_digits(norm):
    """Before (l2): every digit's probabilities NaN or 0/1 garbage; a column's sum of
    squared pixels (up to 28 x 255^2) overflowed float16 in the normalisation."""
    from gpu_mdf.data import load_mnist
    (_, _), (x, _) = load_mnist()
    path = GOLDEN / "example-mnist_softmax.mdf.json"
    ref = compile(path, device="cpu", normalize=norm).run(x[:2000])
    got = compile(path, device="cpu", precision="fp16", normalize=norm).run(x[:2000])
    assert got.dtype == np.float16 and np.isfinite(got).all()
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.99
    if norm != "none":             # pixels up to 255 unnormalised: logits beyond half's reach
        assert np.abs(got - ref).max() < 2e-2


def test_tf32_sets_the_compute_type_around_the_products_only(strict_gpu):
    import fake_cupy
    from cupy._core import _routines_linalg as linalg
    path, feeds, consts = golden("pytorch-style-cnn_pool")
    prog = compile(path, device=strict_gpu, constants=consts, precision="tf32")
    assert prog.tf32 and "TF32" in prog.describe()
    products = sum(1 for st in prog.plan.steps if getattr(getattr(st, "spec", None), "name", "") in
                   ("onnx::Conv", "onnx::Gemm", "onnx::MatMul"))
    fake_cupy.COUNT.reset()
    got = as_dict(prog, prog.run(feeds))
    assert fake_cupy.COUNT.tf32_products >= products > 0
    assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_DEFAULT      # put back
    plain = compile(path, device=strict_gpu, constants=consts)
    fake_cupy.COUNT.reset()
    want = as_dict(plain, plain.run(feeds))
    assert fake_cupy.COUNT.tf32_products == 0
    for k in want:        # the stand-in does not emulate TF32's rounding: the same numbers
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


def test_tf32_puts_the_compute_type_back_after_a_failing_batch(strict_gpu):
    from cupy._core import _routines_linalg as linalg
    path, feeds, consts = golden("example-mnist_softmax")
    from gpu_mdf.engine.ops import OpError
    prog = compile(path, device=strict_gpu, constants=consts, precision="tf32")
    seen = []
    key, _, release, what = prog._steps[-1]

    def fails(env):                          # a kernel refusing a value known only at run time
        seen.append(linalg.get_compute_type(np.float32))
        raise OpError("refused")
    prog._steps[-1] = (key, fails, release, what)
    with pytest.raises(DataError, match="refused"):
        prog.run(feeds)
    assert seen == [linalg.COMPUTE_TYPE_TF32]
    assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_DEFAULT


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "tf32"}, "precision tf32 is a cuBLAS math mode of NVIDIA GPUs; this program runs on cpu"),
    ({"precision": "fp16", "dtype": "float64"}, "precision fp16 computes in float16; dtype float64 contradicts"),
    ({"precision": "bf16"}, "unknown precision 'bf16'; expected one of fp32, fp16, tf32"),
    ({"precision": "FP16"}, "unknown precision 'FP16'"),
    ({"precision": "fp32", "dtype": "float64"}, "precision fp32 computes in float32; dtype float64 contradicts"),
])
def test_what_does_not_fit_is_refused_in_one_line(kwargs, message):
    with pytest.raises(CompileError) as e:
        compile(GOLDEN / "example-mnist_softmax.mdf.json", device="cpu", **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_fp32_is_the_default_and_changes_nothing():
    path, feeds, consts = golden("keras-Conv2D-same")
    a = compile(path, device="cpu", constants=consts)
    b = compile(path, device="cpu", constants=consts, precision="fp32")
    assert b.dtype == a.dtype == np.float32 and not b.tf32
    np.testing.assert_array_equal(a.run(feeds), b.run(feeds))


def test_bench_reports_fp16_agreement_and_says_why_tf32_is_not_measured(tmp_path):
    import json

    from click.testing import CliRunner

    from gpu_mdf.cli import main
    r = CliRunner().invoke(main, ["bench", str(GOLDEN / "example-mnist_softmax.mdf.json"), "--repeats", "2",
                                  "--batch", "512", "--skip", "onnxruntime", "--skip", "evaluablegraph",
                                  "--precision", "fp16", "--precision", "tf32", "--json-out", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    rows = {row["engine"]: row for row in json.loads((tmp_path / "b.json").read_text())["rows"]}
    row = rows["gpu-mdf (NumPy, CPU, fp16)"]
    assert 0 < row["max_abs_diff_vs_gpu_mdf"] < 2e-2 and row["top1_agreement_vs_gpu_mdf"] >= 0.99
    assert "top-1 agreement" in r.output
    assert "gpu-mdf (CuPy, tf32): not measured (" in r.output


def test_bench_times_both_precisions_on_a_gpu(strict_gpu, monkeypatch, tmp_path):
    """The GPU rows of ``bench --precision``, on the stand-in posing as a visible GPU."""
    import json

    import fake_cupy
    from click.testing import CliRunner

    from gpu_mdf.cli import main
    from gpu_mdf.engine import backend
    monkeypatch.setattr(backend, "probe_gpu", lambda: backend.GpuProbe(
        True, "strict CuPy stand-in", fake_cupy, [{"index": 0, "name": "stand-in"}]))
    r = CliRunner().invoke(main, ["bench", str(GOLDEN / "pytorch-style-cnn_pool.mdf.json"), "--repeats", "2",
                                  "--constants", str(_constants_npz(tmp_path, "pytorch-style-cnn_pool")),
                                  "--skip", "onnxruntime", "--skip", "evaluablegraph", "--batch", "16",
                                  "--precision", "fp16", "--precision", "tf32", "--cuda-graphs",
                                  "--json-out", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    rows = {row["engine"]: row for row in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert rows["gpu-mdf (CuPy, device-resident)"]["max_abs_diff_vs_gpu_mdf"] < 1e-5
    assert rows["gpu-mdf (CuPy, CUDA graphs, device-resident)"]["max_abs_diff_vs_gpu_mdf"] < 1e-5
    assert "CUDA graphs: 1 captured" in r.output
    assert 0 < rows["gpu-mdf (CuPy, fp16, device-resident)"]["max_abs_diff_vs_gpu_mdf"] < 2e-2
    assert rows["gpu-mdf (CuPy, tf32, device-resident)"]["max_abs_diff_vs_gpu_mdf"] < 1e-5
    assert fake_cupy.COUNT.tf32_products > 0


def _constants_npz(tmp_path, name):
    _, _, consts = golden(name)
    np.savez(tmp_path / "c.npz", **consts)
    return tmp_path / "c.npz"


def test_fp16_refuses_a_graph_that_leaves_float16():
    """Before: after an explicit Cast to float32 (Keras's sparsemax) the rest of the
    program, output included, ran in float32 under "fp16"."""
    path, _, consts = golden("keras-activation-sparsemax")
    with pytest.raises(CompileError, match=r"precision fp16: .* gives float32, so the program would not run in "
                                           r"float16 throughout") as e:
        compile(path, device="cpu", constants=consts, precision="fp16")
    assert "\n" not in str(e.value)


def test_fp16_refuses_inputs_beyond_half_range():
    """Before: 70,000 became inf in the cast and the outputs NaN, with at most a warning."""
    path, feeds, consts = golden("keras-Dense")
    prog = compile(path, device="cpu", constants=consts, precision="fp16")
    name, x = next(iter(feeds.items()))
    big = x.astype(np.float32).copy()
    big.flat[3] = 70000.0
    with pytest.raises(DataError, match=r"values up to 7e\+04 exceed float16's range \(65504\) under precision fp16"):
        prog.run({name: big})
    prog.run({name: x.astype(np.float32)})           # within range: runs


def test_fp32_with_a_contradicting_dtype_is_refused():
    with pytest.raises(CompileError, match="precision fp32 computes in float32; dtype float16 contradicts it"):
        compile(GOLDEN / "example-mnist_softmax.mdf.json", device="cpu", precision="fp32", dtype="float16")


def test_tf32_is_refused_before_ampere(strict_gpu, monkeypatch):
    import fake_cupy
    monkeypatch.setattr(fake_cupy._Device, "compute_capability", "75")
    with pytest.raises(CompileError, match=r"tf32 needs an Ampere or newer GPU \(compute capability 8.0\+\); "
                                           r"gpu:0 has 7.5"):
        compile(GOLDEN / "example-mnist_softmax.mdf.json", device=strict_gpu, precision="tf32")


def test_infer_in_fp16_is_its_own_job_and_agrees_with_float32(reference_mdf, tmp_path):
    """``infer --precision fp16``: float16 probabilities, the precision in job.json (a rerun
    in float32 is another job, never a resume of this one), predictions agreeing."""
    import json

    from click.testing import CliRunner

    from gpu_mdf.cli import main
    run = CliRunner()
    base = ["infer", str(reference_mdf), "--device", "cpu", "--no-progress", "--data", "mnist:test"]
    r16 = run.invoke(main, base + ["--precision", "fp16", "--out", str(tmp_path / "h")])
    assert r16.exit_code == 0, r16.output
    assert "precision fp16 (approximate" in r16.output
    job = json.loads((tmp_path / "h" / "job.json").read_text())
    assert job["precision"] == "fp16" and job["dtype"] == "float16"
    r32 = run.invoke(main, base + ["--out", str(tmp_path / "h")])
    assert r32.exit_code != 0 and "another job" in r32.output       # not a resume of the fp16 job
    r32 = run.invoke(main, base + ["--out", str(tmp_path / "f")])
    assert r32.exit_code == 0, r32.output
    p16 = np.load(tmp_path / "h" / "probabilities.npy")
    p32 = np.load(tmp_path / "f" / "probabilities.npy")
    assert p16.shape == p32.shape == (10000, 10)
    assert np.mean(p16.argmax(1) == p32.argmax(1)) >= 0.99
    assert np.abs(p16.astype(np.float64) - p32).max() < 2e-2


def test_infer_refuses_tf32_on_the_cpu(reference_mdf, tmp_path):
    from click.testing import CliRunner

    from gpu_mdf.cli import main
    r = CliRunner().invoke(main, ["infer", str(reference_mdf), "--device", "cpu", "--precision", "tf32",
                                  "--no-progress", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "precision tf32 is a cuBLAS math mode of NVIDIA GPUs" in r.output
