"""CuPy backend checks: run on a machine with an NVIDIA GPU (scripts/gpu_check.sh).

They need only NumPy, CuPy and MDF files: set GPU_MDF_CHECK_DIR to a folder made by
scripts/prepare_gpu_check.py (reference.mdf.json, cnn.mdf.json); without it the
files are built here with Keras when Keras is installed.
"""

import os
from pathlib import Path

import numpy as np
import pytest

from gpu_mdf.backend import probe_gpu, select_backend
from gpu_mdf.data import open_dataset
from gpu_mdf.engine import compile
from gpu_mdf.errors import DeviceError

PROBE = probe_gpu()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not PROBE.usable, reason=f"no usable GPU: {PROBE.reason}")]


@pytest.fixture(scope="module")
def mdf_files(tmp_path_factory):
    d = os.environ.get("GPU_MDF_CHECK_DIR")
    if d:
        files = {"reference": Path(d) / "reference.mdf.json", "cnn": Path(d) / "cnn.mdf.json"}
        missing = [str(p) for p in files.values() if not p.exists()]
        if missing:
            pytest.fail(f"GPU_MDF_CHECK_DIR lacks {missing}")
        return files
    pytest.importorskip("keras")
    import subprocess
    import sys
    out = tmp_path_factory.mktemp("gpu_check")
    subprocess.run([sys.executable, "scripts/prepare_gpu_check.py", str(out), "--quick"], check=True)
    return {"reference": out / "reference.mdf.json", "cnn": out / "cnn.mdf.json"}


@pytest.fixture(scope="module")
def images():
    return open_dataset().read(0, 4000)


@pytest.mark.parametrize("name", ["reference", "cnn"])
def test_cupy_agrees_with_numpy(mdf_files, images, name):
    cpu = compile(mdf_files[name], device="cpu")
    gpu = compile(mdf_files[name], device="gpu")
    assert gpu.backend.name == "cupy" and gpu.backend.device == "gpu:0"
    x = images if cpu.inputs[0].shape[1:] == images.shape[1:] else images[..., None]
    np.testing.assert_allclose(gpu.run(x), cpu.run(x), atol=1e-5, rtol=0)


def test_overlapped_stream_equals_single_runs(mdf_files, images):
    gpu = compile(mdf_files["reference"], device="gpu")
    chunks = [images[i:i + 700] for i in range(0, len(images), 700)]   # ragged last chunk
    streamed = np.concatenate(list(gpu.run_many(iter(chunks))))
    np.testing.assert_allclose(streamed, gpu.run(images), atol=1e-6)


def test_batch_size_follows_a_memory_cap(mdf_files):
    import cupy as cp
    gpu = compile(mdf_files["reference"], device="gpu")
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


def test_out_of_memory_chunk_is_split_not_fatal(mdf_files, images):
    import cupy as cp

    from gpu_mdf.engine.stream import run_split_on_oom
    gpu = compile(mdf_files["reference"], device="gpu")
    cpu = compile(mdf_files["reference"], device="cpu")
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
