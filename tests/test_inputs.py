"""Inputs as people have them: image folders of any size, colour and polarity, flattened
arrays, Kaggle CSV, float pixels, values that overflow the model."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from gpu_mdf.cli import main
from gpu_mdf.data import open_dataset
from gpu_mdf.data.images import dark_on_light, to_mnist

N = 300


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def infer(mdf, data, out, *more):
    r = invoke("infer", mdf, "--data", data, "--out", out, "--device", "cpu", "--no-progress", *more)
    assert r.exit_code == 0, r.output
    return json.loads((out / "metrics.json").read_text())


def digit_folder(root, mnist, transform=lambda a, i: a, save=lambda im, p: im.save(p.with_suffix(".png"))):
    (_, _), (xte, yte) = mnist
    for i in range(N):
        sub = root / str(yte[i])
        sub.mkdir(parents=True, exist_ok=True)
        im = transform(xte[i], i)
        save(im if isinstance(im, Image.Image) else Image.fromarray(im), sub / f"{i:04d}")
    return root


def scan_like(a, i):
    """A dark digit on a light page, larger and off-centre, in colour for every third."""
    page = np.full((90 + i % 7, 80 + i % 5), 235, np.uint8)
    big = np.asarray(Image.fromarray(255 - a).resize((56, 56), Image.Resampling.BILINEAR))
    y, x = 10 + i % 13, 5 + i % 11
    page[y:y + 56, x:x + 56] = np.minimum(page[y:y + 56, x:x + 56], big)
    if i % 3 == 0:
        return Image.fromarray(page).convert("RGB")
    if i % 3 == 1:
        rgba = Image.fromarray(page).convert("RGBA")
        return rgba
    return page


def test_polarity_and_mnist_preprocessing(reference_mdf, mnist, tmp_path):
    """Black-on-white digits (scans, drawings) score like white-on-black ones."""
    white = infer(reference_mdf, digit_folder(tmp_path / "white", mnist), tmp_path / "o_white")
    black = infer(reference_mdf, digit_folder(tmp_path / "black", mnist, lambda a, i: 255 - a), tmp_path / "o_black")
    as_is = infer(reference_mdf, tmp_path / "black", tmp_path / "o_no", "--invert", "no")
    assert white["invert"]["images_inverted"] == 0 and black["invert"]["images_inverted"] == N
    assert black["invert"]["mode"] == "auto" and as_is["invert"]["mode"] == "no"
    assert black["accuracy"] == pytest.approx(white["accuracy"], abs=1e-9)   # inverting 28x28 is exact
    assert white["accuracy"] > 0.85 and as_is["accuracy"] < 0.35
    forced = infer(reference_mdf, tmp_path / "white", tmp_path / "o_yes", "--invert", "yes")
    assert forced["accuracy"] < 0.35 and forced["invert"]["images_inverted"] == N
    # larger, off-centre, mixed sizes, RGB/RGBA, JPEG: MNIST's own preprocessing brings them back
    scans = digit_folder(tmp_path / "scans", mnist, scan_like,
                         save=lambda im, p: (im.convert("RGB").save(p.with_suffix(".jpg"), quality=95)
                                             if int(p.stem) % 4 == 0 else im.save(p.with_suffix(".png"))))
    s = infer(reference_mdf, scans, tmp_path / "o_scans")
    assert s["invert"]["images_inverted"] == N and s["skipped"] == 0
    assert s["accuracy"] > white["accuracy"] - 0.06, (s["accuracy"], white["accuracy"])
    print(f"accuracy: white-on-black {white['accuracy']:.4f}, black-on-white {black['accuracy']:.4f} "
          f"(--invert no: {as_is['accuracy']:.4f}), scans {s['accuracy']:.4f}")
    rows = list(csv.DictReader(open(tmp_path / "o_scans" / "predictions.csv")))
    assert any(r["source"].endswith(".jpg") for r in rows) and all("scans" in r["source"] for r in rows)


def test_to_mnist_fits_the_bounding_box_and_centres_the_mass():
    a = np.full((100, 60), 250, np.uint8)
    a[10:50, 5:25] = 0                                    # a dark 40x20 bar near the top left
    assert dark_on_light(a)
    out, flipped = to_mnist(a)
    assert flipped and out.shape == (28, 28)
    ys, xs = np.nonzero(out > 128)
    assert ys.max() - ys.min() + 1 == 20                  # the long side fits 20 pixels
    assert 9 <= xs.max() - xs.min() + 1 <= 11             # aspect ratio kept
    mass = out.astype(float)
    cy = (np.arange(28)[:, None] * mass).sum() / mass.sum()
    cx = (np.arange(28)[None, :] * mass).sum() / mass.sum()
    assert abs(cy - 13.5) < 1 and abs(cx - 13.5) < 1
    blank, _ = to_mnist(np.full((50, 50), 255, np.uint8))
    assert not blank.any()


def test_bad_files_are_one_row_each_wherever_they_sort(reference_mdf, mnist, tmp_path):
    d = digit_folder(tmp_path / "d", mnist)
    (d / "0" / "0000_corrupt.png").write_bytes(b"\x89PNG broken")          # sorts first in its folder
    (d / "7" / "aaa.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(d / "3" / "tiny_rgb.png")   # readable: fine
    r = invoke("infer", reference_mdf, "--data", d, "--out", tmp_path / "fail", "--device", "cpu", "--no-progress")
    assert r.exit_code == 2 and "0000_corrupt.png: unreadable image" in r.output
    m = infer(reference_mdf, d, tmp_path / "skip", "--on-error", "skip")
    errors = list(csv.DictReader(open(tmp_path / "skip" / "errors.csv")))
    assert sorted(e["item"].rsplit("/", 1)[1] for e in errors) == ["0000_corrupt.png", "aaa.jpg"]
    assert m["skipped"] == 2 and m["images"] == N + 3
    assert m["accuracy"] > 0.8


def test_array_layouts_give_the_same_predictions(reference_mdf, mnist, tmp_path):
    (_, _), (xte, yte) = mnist
    np.save(tmp_path / "y.npy", yte[:N])
    outs = {}
    for name, arr in {"nhw": xte[:N], "flat": xte[:N].reshape(N, 784), "nhwc": xte[:N, :, :, None]}.items():
        np.save(tmp_path / f"{name}.npy", arr)
        infer(reference_mdf, tmp_path / f"{name}.npy", tmp_path / name, "--labels", tmp_path / "y.npy")
        outs[name] = np.load(tmp_path / name / "probabilities.npy")
    np.testing.assert_array_equal(outs["flat"], outs["nhw"])
    np.testing.assert_array_equal(outs["nhwc"], outs["nhw"])
    np.save(tmp_path / "bad.npy", xte[:5].reshape(5, 28 * 28)[:, :700])
    r = invoke("infer", reference_mdf, "--data", tmp_path / "bad.npy", "--out", tmp_path / "b", "--device", "cpu")
    assert r.exit_code == 2 and "784 values an item" in r.output


@pytest.mark.parametrize("layout", ["label+header", "header", "no header", "label, no header"])
def test_kaggle_csv(reference_mdf, mnist, tmp_path, layout):
    (_, _), (xte, yte) = mnist
    flat = xte[:N].reshape(N, 784).astype(int)
    path = tmp_path / "digits.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        label = layout.startswith("label")
        if "no header" not in layout:
            w.writerow((["label"] if label else []) + [f"pixel{i}" for i in range(784)])
        for i in range(N):
            w.writerow(([int(yte[i])] if label else []) + flat[i].tolist())
    ds = open_dataset(path)
    assert len(ds) == N and ds.dtype == np.uint8
    np.testing.assert_array_equal(ds.read(10, 17), xte[10:17])              # a row range, read alone
    assert (ds.labels is not None) == label
    m = infer(reference_mdf, path, tmp_path / "o")
    np.save(tmp_path / "x.npy", xte[:N])
    infer(reference_mdf, tmp_path / "x.npy", tmp_path / "ref")
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "probabilities.npy"),
                                  np.load(tmp_path / "ref" / "probabilities.npy"))
    assert ("accuracy" in m) == label
    rows = list(csv.DictReader(open(tmp_path / "o" / "predictions.csv")))
    assert rows[5]["source"] == "digits.csv row 5"


def test_csv_that_is_not_mnist_is_refused(reference_mdf, tmp_path):
    p = tmp_path / "other.csv"
    p.write_text("a,b,c\n1,2,3\n")
    r = invoke("infer", reference_mdf, "--data", p, "--out", tmp_path / "o", "--device", "cpu")
    assert r.exit_code == 2 and "expected 784 pixels" in r.output


def test_float_pixels_are_normalised_as_the_graph_says(reference_mdf, mnist, tmp_path):
    """The same images as uint8, as 0-255 floats and as 0-1 floats: one result (l2 graph)."""
    (_, _), (xte, yte) = mnist
    np.save(tmp_path / "y.npy", yte[:N])
    results = {}
    for name, arr in {"uint8": xte[:N], "f255": xte[:N].astype(np.float32),
                      "f01": xte[:N].astype(np.float32) / 255}.items():
        np.save(tmp_path / f"{name}.npy", arr)
        m = infer(reference_mdf, tmp_path / f"{name}.npy", tmp_path / name, "--labels", tmp_path / "y.npy")
        results[name] = (np.load(tmp_path / name / "probabilities.npy"), m)
    base, m8 = results["uint8"]
    for name in ("f255", "f01"):
        probs, m = results[name]
        np.testing.assert_allclose(probs, base, atol=1e-5)
        assert m["accuracy"] == m8["accuracy"]
        assert m["normalize"] == {"mode": "l2", "applied": "on the host (float pixels)"}
    assert m8["normalize"]["applied"] == "on the device"
    # --normalize none: the values are fed as they are, and metrics say so
    m = infer(reference_mdf, tmp_path / "f01.npy", tmp_path / "none", "--normalize", "none")
    assert m["normalize"] == {"mode": "none", "applied": "no"}


def test_scale_graph_refuses_floats_that_look_already_scaled(mnist, tmp_path):
    from gpu_mdf.engine import compile
    (_, _), (xte, _) = mnist
    node = {"input_ports": {"x": {"shape": [1, 28, 28], "metadata": {"batch_axis": 0}}},
            "functions": {"f": {"function": "onnx::Flatten", "args": {"input": "x"}}},
            "output_ports": {"y": {"value": "f"}}}
    model = {"m": {"graphs": {"g": {"nodes": {"n": node}, "metadata": {"gpu_mdf": {"normalize": "scale"}}}}}}
    path = tmp_path / "scale.json"
    path.write_text(json.dumps(model))
    np.save(tmp_path / "f01.npy", xte[:20].astype(np.float32) / 255)
    r = invoke("infer", path, "--data", tmp_path / "f01.npy", "--out", tmp_path / "o", "--device", "cpu")
    assert r.exit_code == 2 and "look already scaled" in r.output and "--normalize none" in r.output
    m = infer(path, tmp_path / "f01.npy", tmp_path / "ok", "--normalize", "none")
    np.testing.assert_allclose(np.load(tmp_path / "ok" / m["outputs"][0]["file"]),
                               compile(path, device="cpu").run(xte[:20]), atol=1e-6)


def test_pixels_that_overflow_the_model_are_per_item_errors(reference_mdf, mnist, tmp_path):
    (_, _), (xte, _) = mnist
    x = xte[:50].astype(np.float32)
    x[[3, 17]] = 3e38                                     # finite, but the model overflows
    np.save(tmp_path / "huge.npy", x)
    r = invoke("infer", reference_mdf, "--data", tmp_path / "huge.npy", "--out", tmp_path / "a", "--device", "cpu",
               "--normalize", "none")
    assert r.exit_code == 2 and "not finite" in r.output and "Warning" not in r.output
    m = infer(reference_mdf, tmp_path / "huge.npy", tmp_path / "b", "--normalize", "none", "--on-error", "skip")
    errors = list(csv.DictReader(open(tmp_path / "b" / "errors.csv")))
    assert [int(e["index"]) for e in errors] == [3, 17] and m["skipped"] == 2
    rows = list(csv.DictReader(open(tmp_path / "b" / "predictions.csv")))
    assert rows[3]["predicted"] == "-1" and rows[4]["predicted"] != "-1"
