"""CuPy backend checks on a real NVIDIA GPU (scripts/gpu_check.sh runs them).

They need only NumPy, CuPy and the bundle of MDF files made by
scripts/prepare_gpu_check.py (set GPU_MDF_CHECK_DIR); without it the bundle is built
here when Keras is installed. Everywhere else they are skipped, and the same code paths
run on the strict CuPy stand-in in test_gpu_seam.py.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from gpu_mdf.data import open_dataset
from gpu_mdf.engine.backend import probe_gpu, select_backend
from gpu_mdf.errors import DeviceError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import gpu_bundle  # noqa: E402

PROBE = probe_gpu()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not PROBE.usable, reason=f"no usable GPU: {PROBE.reason}")]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = os.environ.get("GPU_MDF_CHECK_DIR")
    if d:
        if not (Path(d) / "bundle.json").exists():
            pytest.fail(f"GPU_MDF_CHECK_DIR {d} has no bundle.json: run scripts/prepare_gpu_check.py")
        return {e["name"]: e for e in gpu_bundle.models(d)}
    pytest.importorskip("keras")
    import subprocess
    out = tmp_path_factory.mktemp("gpu_check")
    subprocess.run([sys.executable, "scripts/prepare_gpu_check.py", str(out), "--quick"], check=True)
    return {e["name"]: e for e in gpu_bundle.models(out)}


@pytest.fixture(scope="module")
def images():
    return open_dataset().read(0, 4000)


def names():
    return ["reference.mdf.json", "cnn.mdf.json", "mobilenetv2.mdf.json", "onnx_mobilenet.mdf.json",
            "pytorch_cnn.mdf.json"]


@pytest.mark.parametrize("name", names())
def test_cupy_agrees_with_numpy(bundle, name):
    entry = bundle[name]
    cpu, gpu = gpu_bundle.compiled(entry, "cpu"), gpu_bundle.compiled(entry, "gpu")
    assert gpu.backend.name == "cupy" and gpu.backend.device == "gpu:0"
    x = gpu_bundle.data(entry, cpu, 1000)
    np.testing.assert_allclose(gpu.run(x), cpu.run(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", names())
def test_no_synchronisation_inside_a_batch(bundle, name):
    """CuPy's own detector (cupyx.allow_synchronize, deprecated but present in CuPy 14)
    raises if anything waits for the device while a batch runs on it."""
    import cupyx
    if not hasattr(cupyx, "allow_synchronize"):
        pytest.fail("this CuPy has no cupyx.allow_synchronize; the stand-in tests count syncs instead")
    entry = bundle[name]
    gpu = gpu_bundle.compiled(entry, "gpu")
    x = gpu.prepare(gpu_bundle.data(entry, gpu, 256))
    gpu.execute({gpu.primary_input.name: x})          # warm-up: kernels compiled, index arrays cached
    with cupyx.allow_synchronize(False):
        out = gpu.execute({gpu.primary_input.name: x})
    import cupy as cp
    assert all(isinstance(v, cp.ndarray) for v in out.values())     # results stay on the device


@pytest.mark.parametrize("name", names())
def test_generated_kernels_agree_and_no_batch_grows_the_pool(bundle, name):
    """The optimised program (fused chains, softmax rows, im2col and depthwise kernels,
    compiled by CuPy from the generated sources) against the graph as written, and CuPy's
    memory pool holding the same bytes after the warm-up batches."""
    import cupy as cp
    entry = bundle[name]
    opt, plain = gpu_bundle.compiled(entry, "gpu"), gpu_bundle.compiled(entry, "gpu", optimize=False)
    x = gpu_bundle.data(entry, opt, 512)
    np.testing.assert_allclose(opt.run(x), plain.run(x), atol=1e-4, rtol=1e-4)
    pool = cp.get_default_memory_pool()
    opt.run(x)
    held = pool.total_bytes()
    for _ in range(3):
        opt.run(x)
    assert pool.total_bytes() == held


@pytest.mark.parametrize("name", names())
def test_cuda_graph_replays_equal_eager_runs(bundle, name):
    """Captured on the second batch of a shape, replayed after: eager execution's numbers
    within float rounding (cuBLAS may pick another algorithm inside a capture, where it
    cannot allocate a workspace), batches of different values (a replay that read stale inputs or wrote where
    the pool gave someone else memory would differ), and the pool's emptying between
    batches (the OOM split's free_all_blocks) does not touch the graph's own memory."""
    import cupy as cp
    entry = bundle[name]
    eager = gpu_bundle.compiled(entry, "gpu")
    graphs = gpu_bundle.compiled(entry, "gpu", cuda_graphs=True)
    xs = [gpu_bundle.data(entry, eager, 256 + k)[k:k + 256] for k in range(6)]
    name_in = graphs.primary_input.name
    # device-resident, no host wait between batches (a run() per batch would hide ordering
    # mistakes): each batch's input freed after its call, so the pool hands its memory on
    outs = []
    for x in xs:
        outs.append(graphs.execute({name_in: graphs.prepare(x)}))
        cp.get_default_memory_pool().free_all_blocks()
    for k, (x, out) in enumerate(zip(xs, outs)):
        want = eager.run(x)
        np.testing.assert_allclose(out[graphs.outputs[0].name].get(), want, rtol=1e-5, atol=1e-6,
                                   err_msg=f"batch {k}")
    cg = graphs.cuda_graphs
    assert cg.graphs and cg.replays == 4, graphs.describe()


@pytest.mark.parametrize("name", names())
def test_reduced_precisions_stay_close_to_float32(bundle, name):
    entry = bundle[name]
    ref = gpu_bundle.compiled(entry, "gpu")
    x = gpu_bundle.data(entry, ref, 512)
    want = np.asarray(ref.run(x), np.float64)
    for precision, tol, least in (("tf32", 1e-2, 0.97), ("fp16", None, 0.9)):
        p = gpu_bundle.compiled(entry, "gpu", precision=precision)
        got = np.asarray(p.run(x), np.float64)
        assert np.isfinite(got).all(), precision
        if tol is not None:          # fp16's error is reported (scripts/gpu_bench.py), not bounded here
            assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max()), precision
        agree = (got.reshape(len(got), -1).argmax(1) == want.reshape(len(want), -1).argmax(1)).mean()
        assert agree >= least, (precision, agree)


def test_overlapped_stream_equals_single_runs(bundle, images):
    gpu = gpu_bundle.compiled(bundle["reference.mdf.json"], "gpu")
    chunks = [images[i:i + 700] for i in range(0, len(images), 700)]   # ragged last chunk
    streamed = np.concatenate(list(gpu.run_many(iter(chunks))))
    np.testing.assert_allclose(streamed, gpu.run(images), atol=1e-6)


def test_bulk_inference_on_the_gpu_matches_the_cpu(bundle, tmp_path):
    from gpu_mdf.infer import run_inference
    path = bundle["cnn.mdf.json"]["path"]
    g = run_inference(path, tmp_path / "g", device="gpu", batch_size=1500, progress=False, log=lambda *_: None)
    c = run_inference(path, tmp_path / "c", device="cpu", batch_size=1500, progress=False, log=lambda *_: None)
    assert g.device == "gpu:0" and g.accuracy == pytest.approx(c.accuracy, abs=2e-4)
    np.testing.assert_allclose(np.load(tmp_path / "g" / "probabilities.npy"),
                               np.load(tmp_path / "c" / "probabilities.npy"), atol=1e-4)


def test_batch_size_follows_a_memory_cap(bundle):
    import cupy as cp
    gpu = gpu_bundle.compiled(bundle["reference.mdf.json"], "gpu")
    pool = cp.get_default_memory_pool()
    free = gpu.suggest_batch_size()
    try:
        pool.set_limit(size=64 << 20)
        capped = gpu.suggest_batch_size()
    finally:
        pool.set_limit(size=0)
    assert capped < free
    assert capped * gpu.bytes_per_item <= (64 << 20)


def test_gpu_index_selection():
    assert select_backend("gpu:0").device == "gpu:0"
    with pytest.raises(DeviceError, match="no such GPU"):
        select_backend(f"gpu:{len(PROBE.devices)}")


def test_out_of_memory_chunk_is_split_not_fatal(bundle, images):
    import cupy as cp

    from gpu_mdf.engine.run import run_split_on_oom
    entry = bundle["reference.mdf.json"]
    gpu, cpu = gpu_bundle.compiled(entry, "gpu"), gpu_bundle.compiled(entry, "cpu")
    big = np.concatenate([images] * 8)        # 32k images: ~60 MB of intermediates
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    try:
        pool.set_limit(size=24 << 20)
        with pytest.raises(cp.cuda.memory.OutOfMemoryError):
            gpu.run(big)
        out = run_split_on_oom(gpu, big)
    finally:
        pool.set_limit(size=0)
    np.testing.assert_allclose(out, cpu.run(big), atol=1e-5)
