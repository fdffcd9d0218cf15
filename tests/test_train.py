import json

import numpy as np
import pytest
from click.testing import CliRunner

from gpu_mdf.cli import main
from gpu_mdf.config import load_config, reference_config
from gpu_mdf.errors import ConfigError


def write_cfg(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_shipped_configs_validate():
    dense = load_config("configs/mnist_dense.yaml")
    assert dense.train.epochs == 3 and [layer["type"] for layer in dense.model.layers] == \
        ["Flatten", "Dense", "Dense", "Dense"]
    assert dense.model.layers == reference_config().model.layers
    cnn = load_config("configs/mnist_cnn.yaml")
    assert cnn.model.input_shape == [28, 28, 1]


@pytest.mark.parametrize("text,match", [
    ("trian: {epochs: 1}", r"unknown key\(s\) \['trian'\]"),
    ("train: {epoch: 1}", r"c.yaml.train: unknown key\(s\) \['epoch'\]"),
    ("train: {epochs: three}", r"train.epochs: expected int"),
    ("data: {normalize: l3}", r"data.normalize: 'l3' is not one of"),
    ("model: {layers: [{units: 3}]}", r"'type' key"),
    ("train: [1, 2]", r"expected a mapping"),
    (": : :", r"not valid YAML"),
])
def test_config_errors_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write_cfg(tmp_path, text))


def test_unknown_layer_or_activation_in_config(tmp_path):
    from gpu_mdf.train import build_model
    bad_layer = write_cfg(tmp_path, "model: {layers: [{type: Flatten}, {type: Dense2, units: 3}]}")
    with pytest.raises(ConfigError, match=r"layers\[1\].type: unknown Keras layer 'Dense2'"):
        build_model(load_config(bad_layer))
    bad_act = write_cfg(tmp_path, "model: {layers: [{type: Flatten}, {type: Dense, units: 3, activation: relux}]}")
    with pytest.raises(ConfigError, match=r"layers\[1\].activation: unknown activation 'relux'"):
        build_model(load_config(bad_act))
    bad_kw = write_cfg(tmp_path, "model: {layers: [{type: Dense, unitz: 3}]}")
    with pytest.raises(ConfigError, match=r"layers\[0\] \(Dense\)"):
        build_model(load_config(bad_kw))


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    r = CliRunner().invoke(main, ["train", "--config", str(write_cfg(tmp_path, "bogus: 1"))])
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and r.output.startswith("error: ") and "bogus" in r.output
    assert "Traceback" not in r.output


def test_short_training_run_writes_everything_and_both_formats_agree(tmp_path, mnist):
    import keras

    out = tmp_path / "train"
    r = CliRunner().invoke(main, ["train", "--out", str(out), "--epochs", "1", "--train-limit", "3000"])
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.output
    for name in ("model.keras", "model.h5", "summary.txt", "history.json", "train_metrics.json", "digit.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["train_images"] == 3000 and metrics["test_accuracy"] > 0.8
    assert metrics["device"] in ("CPU",) or metrics["device"].startswith("GPU")
    assert "dense" in (out / "summary.txt").read_text()
    (_, _), (xte, _) = mnist
    from gpu_mdf.data import normalize
    x = normalize(xte[:256], "l2")
    a = keras.models.load_model(out / "model.keras", compile=False).predict(x, verbose=0)
    b = keras.models.load_model(out / "model.h5", compile=False).predict(x, verbose=0)
    assert np.array_equal(a, b)
    # the model plot needs Graphviz: present, or the run said which picture it skipped and how
    import shutil
    if shutil.which("dot"):
        assert (out / "model_plot.png").stat().st_size > 0
    else:
        assert "skipped model_plot.png" in r.output and "graphviz" in r.output.lower()


def test_training_is_reproducible_with_a_seed(tmp_path):
    from gpu_mdf.config import override
    from gpu_mdf.train import train

    cfg = override(reference_config(), train__epochs=1, data__train_limit=1000)
    a = train(cfg, tmp_path / "a", log=lambda *_: None)
    b = train(cfg, tmp_path / "b", log=lambda *_: None)
    assert a.test_accuracy == b.test_accuracy


def test_config_without_model_section_is_the_reference(tmp_path):
    cfg = load_config(write_cfg(tmp_path, "name: x\ntrain: {epochs: 1}"))
    assert cfg.model.layers == reference_config().model.layers and len(cfg.model.layers) == 4
    with pytest.raises(ConfigError, match="no layers"):
        load_config(write_cfg(tmp_path, "model: {layers: []}"))


def test_training_without_graphviz_completes_and_says_what_was_skipped(tmp_path, monkeypatch):
    import shutil

    from gpu_mdf.config import override
    from gpu_mdf.train import train

    monkeypatch.setattr(shutil, "which", lambda name: None)
    lines = []
    res = train(override(reference_config(), train__epochs=1, data__train_limit=500), tmp_path, log=lines.append)
    assert not (tmp_path / "model_plot.png").exists()
    assert (tmp_path / "model.keras").exists() and (tmp_path / "digit.png").exists()
    assert res.skipped and res.skipped[0][0] == "model_plot.png"
    assert any("skipped model_plot.png" in line and "apt-get install graphviz" in line for line in lines)
