import gzip
import shutil

import numpy as np
import pytest

from gpu_mdf import data
from gpu_mdf.data import normalize, open_dataset, read_idx, write_idx
from gpu_mdf.errors import DataError


def small(mnist, n=50):
    (_, _), (x, y) = mnist
    return x[:n], y[:n]


def test_embedded_mnist_is_the_published_split(mnist):
    (xtr, ytr), (xte, yte) = mnist
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28)
    assert xtr.dtype == np.uint8
    assert list(ytr[:10]) == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert list(yte[:10]) == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert list(np.bincount(yte)) == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_corrupt_embedded_copy_is_detected(tmp_path):
    bad = tmp_path / "mnist.npz"
    raw = bytearray(data.EMBEDDED_MNIST.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt"):
        data.verify_embedded(bad)


def test_npz_round_trip_and_split(tmp_path, mnist):
    x, y = small(mnist)
    p = tmp_path / "m.npz"
    np.savez(p, x_train=x[:20], y_train=y[:20], x_test=x, y_test=y)
    ds = open_dataset(p, split="test")
    assert np.array_equal(ds.read(), x) and np.array_equal(ds.labels, y)
    assert len(open_dataset(p, split="train")) == 20


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_plain_and_gz(tmp_path, mnist, gz):
    x, y = small(mnist)
    ext = ".gz" if gz else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", x)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", y)
    ds = open_dataset(tmp_path)
    assert np.array_equal(ds.read(10, 30), x[10:30])       # random access
    assert np.array_equal(ds.read(), x) and np.array_equal(ds.labels, y)
    chunks = list(ds.chunks(16))
    assert [lo for lo, _ in chunks] == [0, 16, 32, 48]
    assert np.array_equal(np.concatenate([c for _, c in chunks]), x)


def test_idx_corrupt_inputs(tmp_path, mnist):
    x, _ = small(mnist)
    p = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(p, x)
    p.write_bytes(p.read_bytes()[:-100])  # truncated
    with pytest.raises(DataError, match="truncated"):
        open_dataset(p)
    q = tmp_path / "bad-images-idx3-ubyte"
    q.write_bytes(b"\x12\x34\x56\x78" + bytes(100))
    with pytest.raises(DataError, match="magic"):
        open_dataset(q)
    g = tmp_path / "x-images-idx3-ubyte.gz"
    g.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="unreadable IDX"):
        open_dataset(g)


def test_npy_is_read_in_chunks_with_labels(tmp_path, mnist):
    x, y = small(mnist)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    ds = open_dataset(tmp_path / "x.npy", labels=tmp_path / "y.npy")
    assert np.array_equal(ds.read(5, 9), x[5:9]) and np.array_equal(ds.labels, y)
    np.save(tmp_path / "y_short.npy", y[:-1])
    with pytest.raises(DataError, match="49 labels for 50 images"):
        open_dataset(tmp_path / "x.npy", labels=tmp_path / "y_short.npy")


def test_png_folder_with_digit_subfolders(tmp_path, mnist):
    from PIL import Image

    x, y = small(mnist, 12)
    for i, (img, lab) in enumerate(zip(x, y)):
        d = tmp_path / str(lab)
        d.mkdir(exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.png")
    ds = open_dataset(tmp_path)
    got = ds.read()
    order = np.lexsort((np.arange(12), y))  # sorted by folder then name
    assert np.array_equal(got, x[order]) and np.array_equal(ds.labels, y[order])


def test_png_bad_files(tmp_path, mnist):
    from PIL import Image

    x, _ = small(mnist, 3)
    Image.fromarray(x[0]).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"garbage")
    ds = open_dataset(tmp_path)
    with pytest.raises(DataError, match="b.png: unreadable image"):
        ds.read()
    np.testing.assert_array_equal(ds.read(0, 1)[0], x[0])       # a good file reads alone
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    Image.fromarray(np.stack([x[0]] * 3, -1)).save(rgb / "c.png")
    np.testing.assert_array_equal(open_dataset(rgb).read()[0], x[0])   # colour: converted to greyscale


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        open_dataset(tmp_path / "missing.npz")
    (tmp_path / "x.npz").write_bytes(b"PK broken")
    with pytest.raises(DataError, match="unreadable npz"):
        open_dataset(tmp_path / "x.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(DataError, match="missing arrays"):
        open_dataset(tmp_path / "other.npz")
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    with pytest.raises(DataError):
        open_dataset(tmp_path / "s.npy")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match="unknown data format"):
        open_dataset(tmp_path / "f.txt")


def test_l2_normalisation_equals_keras(mnist):
    import keras

    (_, _), (x, _) = mnist
    x = x[:500]
    ours = normalize(x, "l2")
    theirs = keras.utils.normalize(x, axis=1)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(normalize(x, "scale"), x / 255.0, atol=1e-7)


def test_check_finite_names_the_item():
    x = np.zeros((4, 28, 28), np.float32)
    x[2, 3, 3] = np.nan
    with pytest.raises(DataError, match="item 2"):
        data.check_finite(x)


def test_gz_idx_reader_is_sequential_not_whole_file(tmp_path, mnist):
    x, y = small(mnist, 40)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", x)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz") as f:
        assert len(f.read()) == 16 + 40 * 784
    shutil.copy(tmp_path / "t10k-images-idx3-ubyte.gz", tmp_path / "copy-images-idx3-ubyte.gz")
    assert np.array_equal(read_idx(tmp_path / "copy-images-idx3-ubyte.gz"), x)
