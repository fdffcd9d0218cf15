"""What an output is, and how infer scores it: never a classifier by accident.

Every output written; the scored one read for what its values are (probabilities,
logits, sigmoid scores, one value an item, arrays); accuracy only where every label is
one of its classes; --output, --softmax, --min-confidence, --kaggle, --save-preprocessed."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from gpu_mdf.batch.scoring import Accuracy, Stats, read_as, score
from gpu_mdf.cli import main
from gpu_mdf.convert import keras_to_mdf, save_mdf
from gpu_mdf.engine import compile

R = np.random.default_rng(3)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def infer(mdf, out, *more):
    r = invoke("infer", mdf, "--out", out, "--device", "cpu", "--no-progress", *more)
    assert r.exit_code == 0, r.output
    return json.loads((out / "metrics.json").read_text()), r.output


def _read(values, softmax="auto"):
    stats = Stats()
    for part in np.array_split(values, 3):
        stats.add(part)
    return read_as(stats, "y", softmax)


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


LOGITS = R.normal(0, 3, (60, 10))


@pytest.mark.parametrize("values,softmax,kind,column,applied", [
    (_softmax(LOGITS), "auto", "probabilities", "probability", False),
    (_softmax(LOGITS), "yes", "probabilities", "probability", False),       # a distribution already
    (LOGITS, "auto", "logits", "probability", True),
    (LOGITS, "yes", "logits", "probability", True),
    (LOGITS, "no", "scores", "score", False),
    (np.log(_softmax(LOGITS)), "auto", "logits", "probability", True),      # log-probabilities
    (1 / (1 + np.exp(-LOGITS)), "auto", "sigmoid scores", "score", False),  # independent, in [0, 1]
    (1 / (1 + np.exp(-LOGITS)), "yes", "sigmoid scores", "probability", True),
    (R.random((60, 1)), "auto", "sigmoid", "probability", False),           # P(class 1)
    (R.random(60), "yes", "sigmoid", "probability", False),
    (R.normal(0, 5, (60, 1)), "auto", "value", None, False),                # a score or a regression
    (R.random((60, 4, 4)), "auto", "array", None, False),
])
def test_every_kind_of_output_is_read_for_what_it_is(values, softmax, kind, column, applied):
    reading = _read(values, softmax)
    assert (reading.kind, reading.column, reading.softmax) == (kind, column, applied), reading
    assert reading.note
    scored = score(reading, values, top_k=2)
    if reading.probabilities and not reading.one_column:
        np.testing.assert_allclose(scored.values.sum(axis=1), 1, atol=1e-6)
        assert (scored.confidence <= 1).all()
    if kind == "sigmoid":
        p = values.reshape(-1)
        assert (scored.predicted == (p >= 0.5)).all() and np.allclose(scored.confidence, np.maximum(p, 1 - p))


def test_accuracy_only_when_the_labels_are_the_outputs_classes():
    labels = np.arange(100) % 10
    one_column = _read(R.random((100, 1)))
    acc = Accuracy(2, labels)
    acc.add(0, score(one_column, R.random((100, 1)), 0))
    m = acc.metrics("is_even")
    assert m["accuracy"] is None and "labels go up to 9" in m["accuracy_note"] and "2 classes" in m["accuracy_note"]
    wide = R.random((100, 784))                       # 784 values an item read as 784 classes
    acc = Accuracy(784, labels)
    acc.add(0, score(_read(wide), wide, 0))
    assert acc.metrics("y")["accuracy"] is None and "beyond the labels" in acc.metrics("y")["accuracy_note"]
    probs = _softmax(R.normal(0, 3, (100, 10)))
    acc = Accuracy(10, labels)
    acc.add(0, score(_read(probs), probs, 0))
    m = acc.metrics("digit")
    assert m["accuracy"] == pytest.approx((probs.argmax(1) == labels).mean()) and m["labelled"] == 100


# --------------------------------------------------------------------------- #
# Through gpu-mdf infer, with the reference model reshaped
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def variants(reference_model, tmp_path_factory):
    """The reference MLP (i) with an untrained sigmoid ``is_even`` head as its first output
    and the digit head second, (ii) without its softmax (logits, as a PyTorch model has)."""
    import keras
    model, _ = reference_model
    folder = tmp_path_factory.mktemp("variants")
    x = keras.Input((28, 28), name="pixels")
    h = x
    for layer in model.layers[:-1]:
        h = layer(h)
    digit = model.layers[-1](h)
    even = keras.layers.Dense(1, activation="sigmoid", name="is_even")(h)
    logits_layer = keras.layers.Dense(10, name="logits")
    logits = logits_layer(h)
    logits_layer.set_weights(model.layers[-1].get_weights())
    two = save_mdf(keras_to_mdf(keras.Model(x, [even, digit]), normalize="l2"), folder / "two.mdf.json")
    plain = save_mdf(keras_to_mdf(keras.Model(x, logits), normalize="l2"), folder / "logits.mdf.json")
    return two, plain


def test_a_one_column_first_output_is_not_scored_as_a_classifier(variants, reference_mdf, mnist, tmp_path):
    """Before: every prediction 0, accuracy 1.0000 and confusion matrix [[980]] (only the
    label-0 images counted)."""
    two, _ = variants
    (_, _), (xte, yte) = mnist
    prog = compile(two, device="cpu")
    even_name, digit_name = (o.name for o in prog.outputs)
    want = prog.run(xte)
    m, output = infer(two, tmp_path / "auto")
    assert m["output"]["name"] == digit_name and f"output {digit_name}: class probabilities" in output
    reference = compile(reference_mdf, device="cpu").run(xte)
    assert m["accuracy"] == pytest.approx((reference.argmax(1) == yte).mean())
    assert len(m["confusion_matrix"]) == 10
    for o in m["outputs"]:                                         # every output, as it came
        np.testing.assert_allclose(np.load(tmp_path / "auto" / o["file"]), want[o["name"]], atol=1e-6)
    assert [o["name"] for o in m["outputs"]] == [even_name, digit_name]

    m, output = infer(two, tmp_path / "even", "--output", "is_even")          # by its Keras layer's name
    assert m["output"] | {"note": None} == {"name": even_name, "kind": "sigmoid", "softmax_applied": False,
                                            "classes": 2, "note": None}
    assert m["accuracy"] is None and "labels go up to 9" in m["accuracy_note"] and "confusion_matrix" not in m
    assert "no accuracy" in output
    rows = list(csv.DictReader(open(tmp_path / "even" / "predictions.csv")))
    p = want[even_name][:, 0]
    assert [float(r["value"]) for r in rows[:5]] == pytest.approx(p[:5], rel=1e-5)
    assert [int(r["predicted"]) for r in rows] == (p >= 0.5).astype(int).tolist()
    assert not (tmp_path / "even" / "probabilities.npy").exists()

    r = invoke("infer", two, "--output", "is_evn", "--out", tmp_path / "typo", "--device", "cpu")
    assert r.exit_code == 2 and f"did you mean {even_name}?" in r.output and not (tmp_path / "typo").exists()


def test_logits_get_softmax_and_say_so(variants, reference_mdf, mnist, tmp_path):
    """Before: a model without softmax wrote its logits as 'probability 9.025'."""
    _, plain = variants
    (_, _), (xte, yte) = mnist
    logits = compile(plain, device="cpu").run(xte)
    m, output = infer(plain, tmp_path / "auto")
    assert m["output"]["kind"] == "logits" and m["output"]["softmax_applied"] and "softmax applied" in output
    probs = np.load(tmp_path / "auto" / "probabilities.npy")
    np.testing.assert_allclose(probs, _softmax(logits.astype(np.float64)), atol=1e-6)
    np.testing.assert_allclose(probs, compile(reference_mdf, device="cpu").run(xte), atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "auto" / m["outputs"][0]["file"]), logits, atol=1e-5)  # as it came
    rows = list(csv.DictReader(open(tmp_path / "auto" / "predictions.csv")))
    assert all(0 < float(r["probability"]) <= 1 for r in rows)
    assert m["accuracy"] == pytest.approx((logits.argmax(1) == yte).mean())

    m, output = infer(plain, tmp_path / "no", "--softmax", "no", "--top-k", "2")
    assert m["output"]["kind"] == "scores" and not m["output"]["softmax_applied"]
    rows = list(csv.DictReader(open(tmp_path / "no" / "predictions.csv")))
    assert list(rows[0]) == ["index", "source", "predicted", "score", "true", "top1", "top1_score", "top2",
                             "top2_score"]
    assert float(rows[0]["score"]) == pytest.approx(logits[0].max(), rel=1e-5)
    assert not (tmp_path / "no" / "probabilities.npy").exists() and "low_confidence" not in m
    assert m["accuracy"] == pytest.approx((logits.argmax(1) == yte).mean())


def test_low_confidence_is_flagged_and_counted(reference_mdf, mnist, tmp_path):
    (_, _), (xte, _) = mnist
    probs = compile(reference_mdf, device="cpu").run(xte)
    m, output = infer(reference_mdf, tmp_path / "default")
    assert m["low_confidence"] == {"threshold": 0.7, "count": int((probs.max(1) < 0.7).sum())}
    assert f"{m['low_confidence']['count']} below --min-confidence 0.7" in output
    m, output = infer(reference_mdf, tmp_path / "strict", "--min-confidence", "0.95")
    flagged = probs.max(1) < 0.95
    assert m["low_confidence"]["count"] == flagged.sum()
    rows = list(csv.DictReader(open(tmp_path / "strict" / "predictions.csv")))
    assert [r["low_confidence"] == "1" for r in rows] == flagged.tolist()
    r = invoke("infer", reference_mdf, "--min-confidence", "1.5", "--out", tmp_path / "bad")
    assert r.exit_code == 2 and "--min-confidence" in r.output


def test_kaggle_submission(reference_mdf, mnist, tmp_path):
    """Kaggle's test.csv (pixels only, a header) -> submission.csv (ImageId from 1, Label)."""
    (_, _), (xte, _) = mnist
    path = tmp_path / "test.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"pixel{i}" for i in range(784)])
        w.writerows(xte[:50].reshape(50, 784).tolist())
    infer(reference_mdf, tmp_path / "k", "--data", path, "--kaggle")
    rows = list(csv.reader(open(tmp_path / "k" / "submission.csv")))
    predicted = compile(reference_mdf, device="cpu").run(xte[:50]).argmax(1)
    assert rows[0] == ["ImageId", "Label"] and rows[1:] == [[str(i + 1), str(c)] for i, c in enumerate(predicted)]
    node = {"input_ports": {"x": {"shape": [1, 28, 28], "metadata": {"batch_axis": 0}}},
            "functions": {"f": {"function": "onnx::Identity", "args": {"input": "x"}}},
            "output_ports": {"y": {"value": "f"}}}
    images = tmp_path / "identity.json"
    images.write_text(json.dumps({"m": {"graphs": {"g": {"nodes": {"n": node}}}}}))
    r = invoke("infer", images, "--kaggle", "--out", tmp_path / "no", "--device", "cpu")
    assert r.exit_code == 2 and "--kaggle: output y is y (N, 28, 28)" in r.output


def test_save_preprocessed_shows_what_the_model_got(reference_mdf, mnist, tmp_path):
    from damage import damaged_folder
    from PIL import Image

    from gpu_mdf.data import open_dataset
    (_, _), (xte, yte) = mnist
    folder = damaged_folder(tmp_path / "scans", xte[:12], yte[:12], "frame 8 px")
    infer(reference_mdf, tmp_path / "o", "--data", folder, "--save-preprocessed", "5")
    saved = sorted((tmp_path / "o" / "preprocessed").glob("*.png"))
    assert [p.name for p in saved] == [f"{i:06d}.png" for i in range(5)]
    got = np.stack([np.asarray(Image.open(p)) for p in saved])
    np.testing.assert_array_equal(got, open_dataset(folder).read(0, 5))
    assert got.shape == (5, 28, 28) and got[:, :3].max() == 0          # no frame left: black edges
    np.save(tmp_path / "dark.npy", 255 - xte[:4])                       # arrays: after inversion
    infer(reference_mdf, tmp_path / "a", "--data", tmp_path / "dark.npy", "--save-preprocessed", "10")
    saved = sorted((tmp_path / "a" / "preprocessed").glob("*.png"))
    assert len(saved) == 4 and np.array_equal(np.asarray(Image.open(saved[2])), xte[2])
