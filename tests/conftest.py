import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from gpu_mdf.tfquiet import keras_backend  # noqa: E402

try:   # tests that import keras get the backend gpu-mdf would pick (JAX where TensorFlow is absent)
    keras_backend()
except ImportError:
    pass

import numpy as np
import pytest

from gpu_mdf.data import load_mnist, normalize


@pytest.fixture(autouse=True)
def _fresh_conv_runners():
    """Conv runners are chosen once by shapes (nn._RUNNERS); a test that patches a choice's
    knob (PLANES_UP_TO, WINOGRAD_MIN_TILES...) starts and leaves without any."""
    from gpu_mdf.engine.ops import nn
    nn._RUNNERS.clear()
    yield
    nn._RUNNERS.clear()


@pytest.fixture(scope="session")
def mnist():
    return load_mnist()


@pytest.fixture(scope="session")
def x_test_l2(mnist):
    (_, _), (xte, _) = mnist
    return normalize(xte, "l2")


@pytest.fixture(scope="session")
def reference_model(mnist, tmp_path_factory):
    """The reference architecture, trained briefly (1 epoch on 10k images), saved."""
    import keras

    from gpu_mdf.config import reference_config
    from gpu_mdf.train import build_model, prepare_images

    cfg = reference_config()
    keras.utils.set_random_seed(1)
    (xtr, ytr), _ = mnist
    model = build_model(cfg)
    model.fit(prepare_images(xtr[:10000], cfg), ytr[:10000], epochs=1, batch_size=64, verbose=0)
    path = tmp_path_factory.mktemp("ref") / "reference.keras"
    model.save(path)
    return model, path


@pytest.fixture(scope="session")
def reference_mdf(reference_model, tmp_path_factory):
    from gpu_mdf.convert import keras_to_mdf, save_mdf

    model, _ = reference_model
    return save_mdf(keras_to_mdf(model, normalize="l2"), tmp_path_factory.mktemp("mdf") / "ref.json")


def rng():
    return np.random.default_rng(0)


@pytest.fixture
def strict_gpu(monkeypatch):
    """A Backend on the strict CuPy stand-in (tests/fake_cupy.py): counts launches, syncs,
    copies and pool allocations, and runs the generated CUDA kernels as host C."""
    import fake_cupy

    from gpu_mdf.engine.backend import Backend
    if fake_cupy.c_compiler() is None:
        pytest.skip("no C compiler (cc, gcc or clang): the CuPy stand-in runs generated CUDA C on the host")
    fake_cupy.install(monkeypatch)
    yield Backend("cupy", fake_cupy, "gpu:0", "strict CuPy stand-in", 0)
    fake_cupy._pool.set_limit(0)
