"""The GPU code paths, run on the CPU through the strict CuPy stand-in (tests/fake_cupy.py).

The stand-in refuses host arrays mixed with device arrays and implicit conversions, as
CuPy does, and counts every device->host synchronisation and host->device copy. Every
model the converter supports runs through it, matches NumPy, and costs one input copy
and one result copy per batch: nothing else makes a round trip.
"""

import fake_cupy
import numpy as np
import pytest

from gpu_mdf.engine import compile


@pytest.fixture(scope="module")
def images():
    from gpu_mdf.data import open_dataset
    return open_dataset().read(0, 3000)


def assert_no_round_trips(prog, feed, batches=2):
    """Steady state: per batch, one copy in per input and one copy back per output;
    with to_host=False, nothing comes back at all."""
    prog.run(feed)                                  # warm-up (cached index arrays, pools)
    fake_cupy.COUNT.reset()
    for _ in range(batches):
        prog.run(feed)
    n_in = len(feed) if isinstance(feed, dict) else 1
    device_outputs = sum(o.ref.place != "host" for o in prog.outputs)
    assert fake_cupy.COUNT.d2h_syncs == batches * device_outputs, fake_cupy.COUNT.log
    assert fake_cupy.COUNT.h2d_copies == batches * n_in, fake_cupy.COUNT.log
    fake_cupy.COUNT.reset()
    prog.run(feed, to_host=False)
    assert fake_cupy.COUNT.d2h_syncs == 0, fake_cupy.COUNT.log


def matches_numpy(path, backend, feed, atol=1e-5):
    cpu, gpu = compile(path, device="cpu"), compile(path, device=backend)
    want, got = cpu.run(feed), gpu.run(feed)
    if isinstance(want, dict):
        assert set(got) == set(want)
        for k in want:
            assert type(got[k]) is np.ndarray
            np.testing.assert_allclose(got[k], want[k], atol=atol, rtol=1e-5)
    else:
        assert type(got) is np.ndarray
        np.testing.assert_allclose(got, want, atol=atol, rtol=1e-5)
    assert_no_round_trips(gpu, feed)
    return gpu


# --------------------------------------------------------------------------- #
# The stand-in is strict where CuPy is
# --------------------------------------------------------------------------- #
def test_standin_refuses_host_arrays_and_counts_syncs(strict_gpu):
    cp = fake_cupy
    a = cp.asarray(np.ones(3, np.float32))
    assert cp.COUNT.h2d_copies == 1
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    with pytest.raises(TypeError, match="Unsupported type"):
        a * np.array(2.0, np.float32)                 # a 0-d host array: CuPy refuses it
    with pytest.raises(TypeError, match="Unsupported type"):
        np.ones(3) + a
    with pytest.raises(TypeError, match="Unsupported type"):
        cp.maximum(a, np.zeros(3))
    b = a * np.float32(2) + 1.5                       # NumPy and Python scalars are fine
    assert cp.COUNT.d2h_syncs == 0
    float(b.sum())
    b[b > 2]
    b.get()
    assert cp.COUNT.d2h_syncs == 3
    with pytest.raises(AttributeError):
        cp.isposinf(a)                                # not part of the modelled API


# --------------------------------------------------------------------------- #
# Every model kind: same numbers as NumPy, no round trips
# --------------------------------------------------------------------------- #
def test_reference_model(strict_gpu, reference_mdf, images):
    matches_numpy(reference_mdf, strict_gpu, images[:500])


def test_float_input_is_checked_on_the_host(strict_gpu, reference_mdf, images):
    from gpu_mdf.errors import DataError
    gpu = compile(reference_mdf, device=strict_gpu)
    x = images[:50].astype(np.float32) / 255
    x[7, 3, 3] = np.nan
    fake_cupy.COUNT.reset()
    with pytest.raises(DataError, match="item 7"):
        gpu.run(x)
    assert fake_cupy.COUNT.d2h_syncs == 0 and fake_cupy.COUNT.h2d_copies == 0


@pytest.fixture(scope="module")
def keras_cases():
    pytest.importorskip("keras")
    import test_convert as tc
    return tc


def _keras_case_models():
    import test_convert as tc
    cases = [(f"layer-{k}", k) for k in {**tc.LAYER_CASES, **tc.NEW_LAYER_CASES, **tc.MORE_LAYER_CASES}]
    cases += [(f"rnn-{k}", k) for k in tc.RNN_CASES]
    cases += [(f"activation-{a}", a) for a in sorted(tc.ACTIVATIONS)]
    return cases


@pytest.mark.parametrize("case,key", _keras_case_models(), ids=[c for c, _ in _keras_case_models()])
def test_converter_case_on_the_standin(case, key, keras_cases, strict_gpu, tmp_path):
    from gpu_mdf.convert import keras_to_mdf, save_mdf
    tc = keras_cases
    if case.startswith("layer-"):
        shape, ls = {**tc.LAYER_CASES, **tc.NEW_LAYER_CASES, **tc.MORE_LAYER_CASES}[key]
        model = tc.seq(shape, *ls)
    elif case.startswith("rnn-"):
        shape = tc.SEQ
        model = tc.seq(shape, *tc.RNN_CASES[key])
    else:
        shape = (8,)
        model = tc.seq(shape, tc.layers.Dense(6, activation=key))
    x = tc.R.standard_normal((5,) + shape).astype("float32")
    path = save_mdf(keras_to_mdf(model), tmp_path / "m.json")
    matches_numpy(path, strict_gpu, x)


def test_multi_input_multi_output_on_the_standin(keras_cases, strict_gpu, tmp_path):
    from gpu_mdf.convert import keras_to_mdf, save_mdf
    tc = keras_cases
    keras = tc.keras
    keras.utils.set_random_seed(0)
    a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
    da, db = tc.layers.Dense(4, name="da")(a), tc.layers.Dense(4, name="db")(b)
    cat = tc.layers.Concatenate()([tc.layers.Add()([da, db]), tc.layers.Maximum()([da, db])])
    model = tc.randomise(keras.Model([a, b], [tc.layers.Dense(3, activation="softmax")(cat), da]))
    path = save_mdf(keras_to_mdf(model), tmp_path / "m.json")
    feed = {"a": tc.R.standard_normal((4, 6)).astype("float32"), "b": tc.R.standard_normal((4, 6)).astype("float32")}
    matches_numpy(path, strict_gpu, feed)


def test_cnn_config_and_residual_net(keras_cases, strict_gpu, tmp_path, images):
    from gpu_mdf.config import load_config
    from gpu_mdf.convert import keras_to_mdf, save_mdf
    from gpu_mdf.train import build_model
    tc = keras_cases
    keras = tc.keras
    keras.utils.set_random_seed(0)
    cnn = tc.randomise(build_model(load_config("configs/mnist_cnn.yaml")))
    path = save_mdf(keras_to_mdf(cnn, normalize="scale"), tmp_path / "cnn.json")
    # softmax after logits of ~50: the generated im2col + GEMM sums in another order than
    # NumPy's, and the probabilities move by up to ~3e-5
    matches_numpy(path, strict_gpu, images[:64], atol=1e-4)
    inp = keras.Input((16, 16, 3))
    x = tc.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    for _ in range(2):
        y = tc.layers.Conv2D(8, 3, padding="same")(x)
        y = tc.layers.BatchNormalization()(y)
        x = tc.layers.ReLU()(tc.layers.Add()([x, y]))
    x = tc.layers.MaxPooling2D(3, strides=2, padding="same")(x)
    out = tc.layers.Dense(10, activation="softmax")(tc.layers.GlobalAveragePooling2D()(x))
    res = tc.randomise(keras.Model(inp, out))
    path = save_mdf(keras_to_mdf(res), tmp_path / "res.json")
    matches_numpy(path, strict_gpu, tc.R.standard_normal((6, 16, 16, 3)).astype("float32"))


def test_small_vit_on_the_standin(keras_cases, strict_gpu, tmp_path):
    from gpu_mdf.convert import keras_to_mdf, save_mdf
    path = save_mdf(keras_to_mdf(keras_cases.small_vit()), tmp_path / "vit.json")
    matches_numpy(path, strict_gpu, keras_cases.R.random((3, 28, 28, 1), dtype=np.float32))


@pytest.mark.slow
def test_mobilenet_v2_on_the_standin(keras_cases, strict_gpu, tmp_path):
    from gpu_mdf.convert import keras_to_mdf, save_mdf
    tc = tc_ = keras_cases
    keras = tc.keras
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)
    tc_.randomise(model)
    path = save_mdf(keras_to_mdf(model), tmp_path / "mnv2.json")
    x = tc.R.standard_normal((2, 32, 32, 3)).astype("float32")
    gpu = matches_numpy(path, strict_gpu, x, atol=1e-4)
    np.testing.assert_allclose(gpu.run(x), model.predict(x, verbose=0), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- #
# Streaming, memory, batch sizing, the GPU benchmark script
# --------------------------------------------------------------------------- #
def test_overlapped_stream_order_and_ragged_chunks(strict_gpu, reference_mdf, images):
    gpu = compile(reference_mdf, device=strict_gpu)
    chunks = [images[i:i + 700] for i in range(0, len(images), 700)]
    fake_cupy.COUNT.reset()
    outs = list(gpu.run_many(iter(chunks)))
    assert [len(o) for o in outs] == [700, 700, 700, 700, 200]
    np.testing.assert_allclose(np.concatenate(outs), compile(reference_mdf, device="cpu").run(images),
                               atol=1e-6)
    log = [e for e in fake_cupy.COUNT.log if e[0] in ("h2d", "sync")]
    # one copy in and one wait for the result per chunk, nothing else
    assert fake_cupy.COUNT.h2d_copies == 5 and fake_cupy.COUNT.d2h_syncs == 5, log
    # before the host waits for chunk i's result, chunk i+1 is computing and the copy of
    # chunk i+2 has been issued
    assert [k for k, _ in log] == ["h2d", "h2d", "h2d", "sync", "h2d", "sync", "h2d", "sync", "sync", "sync"]
    assert all(what == "Event.synchronize" for k, what in log if k == "sync")


def test_chunk_that_does_not_fit_is_split_and_retried(strict_gpu, reference_mdf, images):
    from gpu_mdf.engine.run import run_split_on_oom
    gpu = compile(reference_mdf, device=strict_gpu)
    fake_cupy._pool.set_limit(1000 * 28 * 28 * 4)       # room for ~1000 float32 images
    with pytest.raises(fake_cupy.OutOfMemoryError):
        gpu.run(images)
    out = run_split_on_oom(gpu, images)
    np.testing.assert_allclose(out, compile(reference_mdf, device="cpu").run(images), atol=1e-6)
    # the overlapped stream recovers the same way
    outs = list(gpu.run_many(iter([images[:500], images, images[:300]])))
    assert [len(o) for o in outs] == [500, 3000, 300]
    np.testing.assert_allclose(outs[1], out, atol=1e-6)


def test_batch_size_follows_free_memory(strict_gpu, reference_mdf):
    gpu = compile(reference_mdf, device=strict_gpu)
    fake_cupy._pool.set_limit(64 << 20)
    capped = gpu.suggest_batch_size()
    assert capped == (32 << 20) // gpu.bytes_per_item      # half of what is free
    assert gpu.suggest_batch_size(100) == 100
    fake_cupy._pool.set_limit(0)
    assert gpu.suggest_batch_size() > capped


def test_gpu_benchmark_script_logic(strict_gpu, reference_mdf, tmp_path):
    """scripts/gpu_bench.py, the GPU check's table, runs end to end on the stand-in, on a
    bundle like the one scripts/prepare_gpu_check.py makes (an MNIST model and an
    imported graph with its weights as constants)."""
    import importlib.util
    import json
    import shutil
    import sys
    from pathlib import Path

    import mdf_fixtures as F
    shutil.copy(reference_mdf, tmp_path / "reference.mdf.json")
    mdf, weights = F.import_onnx(F.mobilenet_block(batch=1))
    (tmp_path / "onnx_block.mdf.json").write_text(json.dumps(mdf.to_dict()))
    np.savez(tmp_path / "onnx_block.constants.npz", **weights)
    (tmp_path / "bundle.json").write_text(json.dumps({
        "reference.mdf.json": {"data": "mnist"},
        "onnx_block.mdf.json": {"data": "random", "constants": "onnx_block.constants.npz"}}))
    sys.path.insert(0, str(Path("scripts").resolve()))
    spec = importlib.util.spec_from_file_location("gpu_bench", Path("scripts/gpu_bench.py"))
    gpu_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_bench)
    import gpu_bundle
    rows = [gpu_bench.bench(e, 3000, device=strict_gpu, reps=2, rounds=(1, 1)) for e in gpu_bundle.models(tmp_path)]
    for row in rows:
        assert row["max_abs_diff_vs_numpy"] < 1e-5 and row["argmax_agreement"] == 1.0
        assert row["device_resident_images_per_s"] > 0 and row["end_to_end_images_per_s"] > 0
        fp16, tf32 = row["precisions"]["fp16"], row["precisions"]["tf32"]
        assert 0 < fp16["max_abs_diff_vs_fp32"] < 2e-2 and fp16["argmax_agreement"] >= 0.99
        assert tf32["max_abs_diff_vs_fp32"] == 0      # the stand-in does not emulate TF32's rounding
        graphs = row["cuda_graphs"]
        assert graphs["captured"] and graphs["replays"] > 0 and graphs["max_abs_diff_vs_eager"] == 0
    assert rows[0]["input_dtype"] == "uint8" and rows[1]["input_dtype"] == "float32"


def test_bulk_inference_streams_on_a_gpu_and_resumes_identically(strict_gpu, reference_mdf, tmp_path):
    """gpu-mdf infer on a GPU goes through the overlapped stream: one copy in and one
    wait per chunk, in pipeline order; an interrupted job resumes to the same bytes."""
    from gpu_mdf.infer import run_inference
    gpu = compile(reference_mdf, device=strict_gpu)
    fake_cupy.COUNT.reset()
    full = run_inference(reference_mdf, tmp_path / "full", program=gpu, batch_size=1500, progress=False,
                         log=lambda *_: None)
    assert full.n == 10000 and full.accuracy > 0.8
    kinds = [k for k, _ in fake_cupy.COUNT.log if k in ("h2d", "sync")]
    assert kinds.count("h2d") == 7 and kinds.count("sync") == 7          # 7 chunks of 1,500
    assert kinds[:4] == ["h2d", "h2d", "h2d", "sync"]                      # chunks 1 and 2 sent before 0 returns
    # an interrupted job: some chunks missing, then the same command again
    part = tmp_path / "part"
    run_inference(reference_mdf, part, program=gpu, batch_size=1500, progress=False, log=lambda *_: None,
                  keep_chunks=True)
    for f in ("probabilities.npy", "predictions.csv", "metrics.json"):
        (part / f).unlink()
    for c in sorted((part / ".chunks").glob("*.npz"))[2:5]:
        c.unlink()
    again = run_inference(reference_mdf, part, program=gpu, batch_size=1500, progress=False, log=lambda *_: None)
    assert again.chunks_resumed == 4
    for f in ("probabilities.npy", "predictions.csv"):
        assert (part / f).read_bytes() == (tmp_path / "full" / f).read_bytes()
