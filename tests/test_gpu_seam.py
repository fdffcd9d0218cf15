"""The GPU code paths, run on the CPU through a NumPy-backed CuPy stand-in."""

import sys

import fake_cupy
import numpy as np
import pytest

from gpu_mdf.backend import Backend
from gpu_mdf.engine import compile


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setitem(sys.modules, "cupyx", fake_cupy.cupyx)
    fake_cupy._pool.set_limit(0)
    fake_cupy.Stream.log.clear()
    yield Backend("cupy", fake_cupy, "gpu:0", "fake GPU for tests", 0)
    fake_cupy._pool.set_limit(0)


@pytest.fixture(scope="module")
def images():
    from gpu_mdf.data import open_dataset
    return open_dataset().read(0, 3000)


def test_gpu_path_matches_numpy(fake_gpu, reference_mdf, images):
    cpu = compile(reference_mdf, device="cpu")
    gpu = compile(reference_mdf, device=fake_gpu)
    out = gpu.run(images)
    assert type(out) is np.ndarray        # results come back as host arrays
    np.testing.assert_allclose(out, cpu.run(images), atol=1e-6)


def test_overlapped_stream_order_and_ragged_chunks(fake_gpu, reference_mdf, images):
    gpu = compile(reference_mdf, device=fake_gpu)
    chunks = [images[i:i + 700] for i in range(0, len(images), 700)]
    outs = list(gpu.run_many(iter(chunks)))
    assert [len(o) for o in outs] == [700, 700, 700, 700, 200]
    np.testing.assert_allclose(np.concatenate(outs), compile(reference_mdf, device="cpu").run(images),
                               atol=1e-6)
    # each chunk's copy is recorded on the copy stream and awaited by the compute stream
    assert fake_cupy.Stream.log == ["record", "wait"] * 5


def test_chunk_that_does_not_fit_is_split_and_retried(fake_gpu, reference_mdf, images):
    from gpu_mdf.engine.stream import run_split_on_oom
    gpu = compile(reference_mdf, device=fake_gpu)
    fake_cupy._pool.set_limit(1000 * 28 * 28 * 4)       # room for ~1000 float32 images
    with pytest.raises(fake_cupy.OutOfMemoryError):
        gpu.run(images)
    out = run_split_on_oom(gpu, images)
    np.testing.assert_allclose(out, compile(reference_mdf, device="cpu").run(images), atol=1e-6)
    # the overlapped stream recovers the same way
    outs = list(gpu.run_many(iter([images])))
    np.testing.assert_allclose(outs[0], out, atol=1e-6)


def test_batch_size_follows_free_memory(fake_gpu, reference_mdf):
    gpu = compile(reference_mdf, device=fake_gpu)
    fake_cupy._pool.set_limit(64 << 20)
    capped = gpu.suggest_batch_size()
    assert capped == (32 << 20) // gpu.bytes_per_item      # half of what is free
    assert gpu.suggest_batch_size(100) == 100
    fake_cupy._pool.set_limit(0)
    assert gpu.suggest_batch_size() > capped


def test_gpu_benchmark_script_logic(fake_gpu, reference_mdf):
    """scripts/gpu_bench.py, the GPU check's table, runs end to end on the stand-in."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("gpu_bench", Path("scripts/gpu_bench.py"))
    gpu_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_bench)
    row = gpu_bench.bench(reference_mdf, 30000, device=fake_gpu)
    assert row["max_abs_diff_vs_numpy"] < 1e-5 and row["argmax_agreement"] == 1.0
    assert row["device_resident_images_per_s"] > 0 and row["end_to_end_images_per_s"] > 0
    assert row["images"] == 30000
