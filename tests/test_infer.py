import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from gpu_mdf.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_infer_writes_all_files(reference_mdf, tmp_path, mnist):
    out = tmp_path / "out"
    r = invoke("infer", reference_mdf, "--out", out, "--device", "cpu", "--no-progress")
    assert r.exit_code == 0, r.output
    (_, _), (_, yte) = mnist
    probs = np.load(out / "probabilities.npy")
    assert probs.shape == (10000, 10)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 10000 and list(rows[0]) == ["index", "source", "predicted", "probability", "true",
                                                    "low_confidence"]
    assert rows[3]["source"] == "mnist:test[3]"
    assert [int(r["true"]) for r in rows[:5]] == list(yte[:5])
    m = json.loads((out / "metrics.json").read_text())
    assert m["accuracy"] == pytest.approx((probs.argmax(1) == yte).mean())
    assert np.array(m["confusion_matrix"]).sum() == 10000
    assert set(m["per_class"]) == {str(i) for i in range(10)}
    assert m["device"] == "cpu" and m["images_per_s"] > 0 and "numpy" in m["versions"]
    # provenance: when, which model (path and hash), which data, which software and machine
    import datetime
    datetime.datetime.fromisoformat(m["timestamp"])
    assert m["model"] == str(reference_mdf.resolve()) and len(m["model_sha256"]) == 64
    assert m["data"].startswith("embedded MNIST")
    assert {"modeci_mdf", "cupy"} <= set(m["versions"]) and m["versions"]["cupy"] is None
    assert m["host"]["cpu"] and m["host"]["threads"] >= 1
    assert m["normalize"] == {"mode": "l2", "applied": "on the device"}
    assert not (out / ".chunks").exists()                      # removed after success
    (written,) = m["outputs"]                                   # every output, as it came
    np.testing.assert_array_equal(np.load(out / written["file"]), probs)
    assert m["output"]["kind"] == "probabilities" and not m["output"]["softmax_applied"]
    low = probs.max(axis=1) < m["low_confidence"]["threshold"]
    assert m["low_confidence"]["count"] == low.sum() > 0
    assert [int(r["low_confidence"]) for r in rows] == low.astype(int).tolist()


def test_resume_after_a_real_kill_gives_identical_files(reference_mdf, tmp_path):
    # 60,000 images in 600 chunks: a wide window to kill the job in the middle
    args = [sys.executable, "-m", "gpu_mdf", "infer", str(reference_mdf), "--data", "mnist:train",
            "--device", "cpu", "--batch-size", "100", "--no-progress", "--keep-chunks"]
    full = tmp_path / "full"
    subprocess.run(args + ["--out", str(full)], check=True, capture_output=True)

    part = tmp_path / "part"
    proc = subprocess.Popen(args + ["--out", str(part)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        n = len(list((part / ".chunks").glob("*.npz"))) if (part / ".chunks").exists() else 0
        if n >= 5:
            break
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((part / ".chunks").glob("*.npz")))
    assert 5 <= done < 600, "the job should have been killed mid-way"
    assert not (part / "predictions.csv").exists()
    r = subprocess.run(args + ["--out", str(part)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming: {done} of 600 chunks already done" in r.stderr
    for name in ("probabilities.npy", "predictions.csv"):
        assert (part / name).read_bytes() == (full / name).read_bytes(), name
    assert json.loads((part / "metrics.json").read_text())["chunks_resumed"] == done


def test_changed_model_or_foreign_folder_is_refused(reference_mdf, tmp_path):
    out = tmp_path / "o"
    assert invoke("infer", reference_mdf, "--out", out, "--device", "cpu", "--no-progress").exit_code == 0
    before = (out / "predictions.csv").read_bytes()
    r = invoke("infer", reference_mdf, "--out", out, "--device", "cpu", "--batch-size", "500", "--no-progress")
    assert r.exit_code == 2 and "another job's files (different batch_size)" in r.output and "--overwrite" in r.output
    changed = tmp_path / "changed.json"
    changed.write_text(reference_mdf.read_text().replace('"ModECI MDF v0.4"', '"ModECI MDF v0.4" '))
    r = invoke("infer", changed, "--out", out, "--device", "cpu", "--no-progress")
    assert r.exit_code == 2 and "model" in r.output
    assert (out / "predictions.csv").read_bytes() == before       # nothing already written was damaged
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "predictions.csv").write_text("someone else's\n")
    r = invoke("infer", reference_mdf, "--out", foreign, "--device", "cpu", "--no-progress")
    assert r.exit_code == 2 and "unknown job" in r.output
    assert (foreign / "predictions.csv").read_text() == "someone else's\n"


def test_bad_inputs_are_one_line_errors(reference_mdf, tmp_path):
    np.save(tmp_path / "small.npy", np.zeros((10, 20, 20), np.uint8))
    r = invoke("infer", reference_mdf, "--data", tmp_path / "small.npy", "--out", tmp_path / "a",
               "--device", "cpu", "--no-progress")
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "got shape (10, 20, 20)" in errors[0]
    assert r.output.splitlines()[-1] == errors[0]          # the log lines before it, then the one error line
    x = np.random.default_rng(0).random((20, 28, 28)).astype(np.float32)
    x[7, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    r = invoke("infer", reference_mdf, "--data", tmp_path / "nan.npy", "--out", tmp_path / "b",
               "--device", "cpu", "--no-progress")
    assert r.exit_code == 2 and "item 7 holds NaN" in r.output
    np.save(tmp_path / "labels.npy", np.zeros(19, np.int64))
    r = invoke("infer", reference_mdf, "--data", tmp_path / "nan.npy", "--labels", tmp_path / "labels.npy",
               "--out", tmp_path / "c", "--device", "cpu", "--no-progress")
    assert r.exit_code == 2 and "19 labels for 20 images" in r.output
    r = invoke("infer", tmp_path / "missing.json", "--out", tmp_path / "d", "--no-progress")
    assert r.exit_code == 2 and "no such model file" in r.output
    r = invoke("infer", reference_mdf, "--device", "gpu", "--out", tmp_path / "e", "--no-progress")
    assert r.exit_code == 2 and "GPU was demanded" in r.output
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())


def test_on_error_skip_records_bad_items(reference_mdf, tmp_path, mnist):
    from PIL import Image

    (_, _), (xte, yte) = mnist
    d = tmp_path / "pngs"
    for i in range(6):
        sub = d / str(yte[i])
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(xte[i]).save(sub / f"{i}.png")
    (d / str(yte[0]) / "zz_broken.png").write_bytes(b"not a png")
    out = tmp_path / "o"
    r = invoke("infer", reference_mdf, "--data", d, "--out", out, "--device", "cpu", "--no-progress")
    assert r.exit_code == 2 and "zz_broken.png: unreadable image" in r.output
    r = invoke("infer", reference_mdf, "--data", d, "--out", tmp_path / "o2", "--device", "cpu",
               "--on-error", "skip", "--no-progress")
    assert r.exit_code == 0, r.output
    errors = list(csv.DictReader(open(tmp_path / "o2" / "errors.csv")))
    assert len(errors) == 1 and errors[0]["item"].endswith("zz_broken.png")
    preds = list(csv.DictReader(open(tmp_path / "o2" / "predictions.csv")))
    assert len(preds) == 7 and sum(p["predicted"] == "-1" for p in preds) == 1
    assert json.loads((tmp_path / "o2" / "metrics.json").read_text())["skipped"] == 1


def test_multi_item_job_compiles_each_model_once(reference_mdf, tmp_path, mnist):
    (_, _), (xte, yte) = mnist
    np.save(tmp_path / "x.npy", xte[:300])
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"""
name: batch
infer: {{device: cpu}}
jobs:
  - {{model: {reference_mdf}, data: {tmp_path / 'x.npy'}, name: first}}
  - {{model: {reference_mdf}, name: embedded}}
  - {{model: {tmp_path / 'nope.json'}, name: broken}}
""")
    r = invoke("infer", "--config", cfg, "--out", tmp_path / "jobs", "--no-progress")
    assert r.exit_code == 1, r.output
    assert "ok   first: 300 images" in r.output and "ok   embedded: 10000 images" in r.output
    assert "FAIL broken" in r.output
    assert "1 model(s) compiled for 3 item(s)" in r.output
    assert (tmp_path / "jobs" / "first" / "predictions.csv").exists()


def test_top_k_overwrite_keep_chunks_and_a_finished_job(reference_mdf, tmp_path):
    out = tmp_path / "o"
    r = invoke("infer", reference_mdf, "--out", out, "--device", "cpu", "--no-progress", "--top-k", "3",
               "--keep-chunks")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert list(rows[0])[-6:] == ["top1", "top1_probability", "top2", "top2_probability", "top3",
                                  "top3_probability"]
    probs = np.load(out / "probabilities.npy")
    top = np.argsort(-probs[0])[:3]
    assert [int(rows[0][f"top{k}"]) for k in (1, 2, 3)] == top.tolist() and rows[0]["top1"] == rows[0]["predicted"]
    assert float(rows[0]["top2_probability"]) == pytest.approx(probs[0, top[1]], abs=1e-6)
    assert (out / ".chunks").is_dir()                              # --keep-chunks
    r = invoke("infer", reference_mdf, "--out", out, "--device", "cpu", "--no-progress", "--top-k", "11")
    assert r.exit_code == 2 and "--top-k 11: the model has 10 classes" in r.output
    # another job in the same folder: refused, or replaced with --overwrite (never mixed)
    r = invoke("infer", reference_mdf, "--out", out, "--device", "cpu", "--no-progress", "--batch-size", "999")
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = invoke("infer", reference_mdf, "--out", out, "--device", "cpu", "--no-progress", "--batch-size", "999",
               "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "job.json").read_text())["batch_size"] == 999
    assert list(csv.DictReader(open(out / "predictions.csv")))[0].keys() == \
        {"index", "source", "predicted", "probability", "true", "low_confidence"}
    assert not (out / ".chunks").exists()
    # the same command again: complete already, nothing recomputed or damaged
    before = (out / "predictions.csv").read_bytes()
    r = invoke("infer", reference_mdf, "--out", out, "--device", "cpu", "--no-progress", "--batch-size", "999")
    assert r.exit_code == 0 and "complete already" in r.output
    assert (out / "predictions.csv").read_bytes() == before


def test_stale_temporaries_of_a_killed_final_write_are_cleaned(reference_mdf, tmp_path):
    out = tmp_path / "o"
    args = ["infer", reference_mdf, "--out", out, "--device", "cpu", "--no-progress", "--keep-chunks"]
    assert invoke(*args).exit_code == 0
    for f in ("predictions.csv", "probabilities.npy", "metrics.json"):
        (out / f).unlink()
    (out / ".predictions.csv.abc123.tmp").write_text("half a file")        # what a SIGKILL leaves
    (out / ".chunks" / ".000003.npz.xyz.tmp").write_bytes(b"half")
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert not list(out.glob(".*.tmp")) and not list((out / ".chunks").glob(".*.tmp"))
    assert len(list(csv.DictReader(open(out / "predictions.csv")))) == 10000


@pytest.mark.parametrize("args,match", [
    (["--batch-size", "-5"], "Invalid value for '--batch-size'"),
    (["--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["--device", "tpu"], "expected auto, cpu, gpu or gpu:N"),
    (["--device", "cpu:1"], "expected auto, cpu, gpu or gpu:N"),
    (["--top-k", "-1"], "Invalid value for '--top-k'"),
    (["--invert", "maybe"], "Invalid value for '--invert'"),
    (["--cluster-timeout", "0"], "Invalid value for '--cluster-timeout'"),
])
def test_options_are_validated_before_anything_is_written(reference_mdf, tmp_path, args, match):
    out = tmp_path / "o"
    r = invoke("infer", reference_mdf, "--out", out, "--no-progress", *args)
    assert r.exit_code == 2 and match in r.output, r.output
    assert not out.exists()


def test_cuda_is_an_alias_of_gpu_and_out_must_be_a_folder(reference_mdf, tmp_path):
    r = invoke("infer", reference_mdf, "--out", tmp_path / "o", "--device", "cuda", "--no-progress")
    assert r.exit_code == 2 and "GPU was demanded (gpu)" in r.output     # accepted, then no GPU here
    f = tmp_path / "afile"
    f.write_text("mine")
    r = invoke("infer", reference_mdf, "--out", f, "--device", "cpu", "--no-progress")
    assert r.exit_code == 2 and "a file, not a folder" in r.output and r.output.count("\n") == 1
    assert f.read_text() == "mine"


def test_job_item_names_and_run_names_stay_inside_the_output_folder(reference_mdf, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "link").symlink_to(outside)
    for name in ("../escaped", str(tmp_path / "absolute"), "link"):
        cfg = tmp_path / "job.yaml"
        cfg.write_text(f"name: t\ninfer: {{device: cpu}}\njobs:\n  - {{model: {reference_mdf}, name: '{name}'}}\n")
        r = invoke("infer", "--config", cfg, "--out", tmp_path / "jobs", "--no-progress")
        assert r.exit_code == 1 and "FAIL" in r.output and ("outside" in r.output or "plain relative" in r.output)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "absolute").exists()
    assert not any(outside.iterdir())
    cfg.write_text(f"name: ../../up\njobs:\n  - {{model: {reference_mdf}}}\n")
    r = invoke("infer", "--config", cfg, "--no-progress")
    assert r.exit_code == 2 and "is not a plain name" in r.output


def test_every_command_shows_defaults_and_ends_with_an_example():
    for cmd in ("run", "train", "convert", "infer", "plot", "bench", "info"):
        r = invoke(cmd, "--help")
        assert r.exit_code == 0
        assert "Example:" in r.output and "gpu-mdf " + cmd in r.output.split("Example:")[1], cmd
    assert "[default: runs/infer/<model>-<data>" in " ".join(invoke("infer", "--help").output.split())
    assert "[default: 20; x>=1]" in invoke("bench", "--help").output


# --------------------------------------------------------------------------- #
# A file whose name starts with "mnist" is a file, not the embedded copy
# --------------------------------------------------------------------------- #
def _flatten_mdf(folder):
    """A tiny graph, (N, 2, 2) pixels -> (N, 4) values /255: no training needed."""
    node = {"input_ports": {"x": {"shape": [1, 2, 2], "metadata": {"batch_axis": 0}}},
            "functions": {"f": {"function": "onnx::Flatten", "args": {"input": "x"}}},
            "output_ports": {"y": {"value": "f"}}}
    path = folder / "flatten.json"
    path.write_text(json.dumps({"m": {"graphs": {"g": {"nodes": {"n": node},
                                                       "metadata": {"gpu_mdf": {"normalize": "scale"}}}}}}))
    return path


def _edit_keeping_size(path, pixels):
    """Other pixels, the same shape and size; the modification time moves on."""
    before = path.stat().st_mtime_ns
    np.save(path, pixels)
    os.utime(path, ns=(before + 10**9, before + 10**9))


@pytest.fixture
def mnist_named_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)              # the source is given relative, as people type it
    np.save(tmp_path / "mnist_extra.npy", np.arange(20, dtype=np.uint8).reshape(5, 2, 2))
    return _flatten_mdf(tmp_path), tmp_path / "mnist_extra.npy"


QUIET = {"device": "cpu", "progress": False, "log": lambda *_: None}


def test_an_edited_file_named_like_mnist_is_another_job(mnist_named_file, tmp_path):
    from gpu_mdf.errors import OutputError
    from gpu_mdf.infer import run_inference

    model, data = mnist_named_file
    run_inference(model, "out", source="mnist_extra.npy", **QUIET)
    _edit_keeping_size(data, np.arange(20, 40, dtype=np.uint8).reshape(5, 2, 2))
    with pytest.raises(OutputError, match=r"another job's files \(different data\)"):
        run_inference(model, "out", source="mnist_extra.npy", **QUIET)      # not "complete already"
    job = json.loads((tmp_path / "out" / "job.json").read_text())
    assert "embedded_sha256" not in job["data"] and job["data"]["files"][0][0] == "mnist_extra.npy"
    res = run_inference(model, "out", source="mnist_extra.npy", overwrite=True, **QUIET)
    np.testing.assert_allclose(np.load(res.files["output:y"]), np.arange(20, 40).reshape(5, 4) / 255, rtol=1e-6)


def test_metrics_name_a_file_named_like_mnist_by_its_path(mnist_named_file, tmp_path):
    from gpu_mdf.infer import run_inference

    model, data = mnist_named_file
    res = run_inference(model, "out", source="mnist_extra.npy", **QUIET)
    assert res.metrics["data"] == str(data.resolve())
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["data"] == str(data.resolve())


def test_the_dask_task_carries_the_absolute_path_of_a_file_named_like_mnist(mnist_named_file, tmp_path,
                                                                            monkeypatch):
    """The task a worker gets opens the file itself, from another working folder."""
    from gpu_mdf.batch import ClusterSession, process_chunk, run_inference
    from gpu_mdf.data import open_dataset

    model, data = mnist_named_file
    sent = []

    class InProcessCluster(ClusterSession):
        """Runs each task as a worker would, with no Dask: from another working folder."""

        def describe(self):
            return "in-process stand-in for a cluster"

        def run_chunks(self, task, todo, on_done):
            sent.append(task)
            elsewhere = tmp_path / "worker"
            elsewhere.mkdir()
            monkeypatch.chdir(elsewhere)
            prog, ds = task.model.compile(), task.data.open()
            for i in todo:
                on_done(process_chunk(prog, ds, i, task.spec))
            return {"kind": "in-process", "spec": self.spec, "workers": 1, "per_worker": {}}

    res = run_inference(model, tmp_path / "out", source="mnist_extra.npy",
                        cluster=InProcessCluster("in-process", "in-process", None), **QUIET)
    (task,) = sent
    assert task.data.source == str(data.resolve())
    assert task.model.mdf_path == str(model.resolve())
    assert np.load(res.files["output:y"]).shape == (5, 4)
    monkeypatch.chdir(tmp_path)
    identity = open_dataset("mnist_extra.npy").source.identity()
    assert not identity.embedded and identity.location == str(data.resolve())


# --------------------------------------------------------------------------- #
# Options that apply to every source, metrics that say what happened
# --------------------------------------------------------------------------- #
def test_invert_applies_to_arrays_of_images(reference_mdf, mnist, tmp_path):
    """Before: --invert was ignored for .npy (dark-on-light digits scored 27% with or without it)."""
    (_, _), (xte, yte) = mnist
    np.save(tmp_path / "y.npy", yte[:300])
    np.save(tmp_path / "dark.npy", 255 - xte[:300])
    np.save(tmp_path / "white.npy", xte[:300])
    with open(tmp_path / "dark.csv", "w") as f:                     # every array source: CSV too
        dark = 255 - xte[:300].reshape(300, -1)
        f.writelines(",".join(map(str, [y, *row])) + "\n" for y, row in zip(yte[:300], dark))

    def run(data, *more):
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
        r = invoke("infer", reference_mdf, "--data", tmp_path / data, "--labels", tmp_path / "y.npy", "--out", out,
                   "--device", "cpu", "--no-progress", *more) if data.endswith(".npy") else \
            invoke("infer", reference_mdf, "--data", tmp_path / data, "--out", out, "--device", "cpu",
                   "--no-progress", *more)
        assert r.exit_code == 0, r.output
        return json.loads((out / "metrics.json").read_text())

    white = run("white.npy")
    assert white["invert"] == {"mode": "auto", "images_inverted": 0, "image_size": [28, 28]}
    for data, mode in (("dark.npy", "auto"), ("dark.npy", "yes"), ("dark.csv", "auto")):
        m = run(data, "--invert", mode)
        assert m["accuracy"] == white["accuracy"] and m["invert"]["images_inverted"] == 300, (data, mode)
    assert run("dark.npy", "--invert", "no")["accuracy"] < 0.5
    forced = run("white.npy", "--invert", "yes")
    assert forced["accuracy"] < 0.5 and forced["invert"]["images_inverted"] == 300
    np.save(tmp_path / "tiny.npy", np.zeros((5, 2, 2), np.uint8))
    r = invoke("infer", _flatten_mdf(tmp_path), "--data", tmp_path / "tiny.npy", "--invert", "yes",
               "--out", tmp_path / "t", "--device", "cpu")
    assert r.exit_code == 2 and "--invert yes: its items (2, 2) are not" in r.output


def test_metrics_say_where_normalisation_was_really_applied(mnist, tmp_path):
    """Before: 'applied on the device' for a graph taking uint8, where nothing was applied."""
    (_, _), (xte, _) = mnist
    node = {"input_ports": {"x": {"shape": [1, 28, 28], "type": "uint8", "metadata": {"batch_axis": 0}}},
            "functions": {"c": {"function": "onnx::Cast", "args": {"input": "x", "to": 1}},
                          "f": {"function": "onnx::Flatten", "args": {"input": "c"}}},
            "output_ports": {"y": {"value": "f"}}}
    path = tmp_path / "u8.json"
    path.write_text(json.dumps({"m": {"graphs": {"g": {"nodes": {"n": node},
                                                       "metadata": {"gpu_mdf": {"normalize": "l2"}}}}}}))
    np.save(tmp_path / "x.npy", xte[:20])
    r = invoke("infer", path, "--data", tmp_path / "x.npy", "--out", tmp_path / "o", "--device", "cpu",
               "--no-progress")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["normalize"] == {"mode": "l2", "applied": "no: the graph takes integers (uint8), fed as they are"}
    np.testing.assert_array_equal(np.load(tmp_path / "o" / m["outputs"][0]["file"]), xte[:20].reshape(20, -1))


# --------------------------------------------------------------------------- #
# Job folders: a failed job does not block its fix; jobs without --out do not clash
# --------------------------------------------------------------------------- #
def test_a_failed_job_does_not_block_the_fix_it_suggests(mnist, tmp_path):
    (_, _), (xte, _) = mnist
    model = tmp_path / "scale.json"
    node = {"input_ports": {"x": {"shape": [1, 28, 28], "metadata": {"batch_axis": 0}}},
            "functions": {"f": {"function": "onnx::Flatten", "args": {"input": "x"}}},
            "output_ports": {"y": {"value": "f"}}}
    model.write_text(json.dumps({"m": {"graphs": {"g": {"nodes": {"n": node},
                                                        "metadata": {"gpu_mdf": {"normalize": "scale"}}}}}}))
    np.save(tmp_path / "f01.npy", xte[:20].astype(np.float32) / 255)
    args = ["infer", model, "--data", tmp_path / "f01.npy", "--out", tmp_path / "o", "--device", "cpu",
            "--no-progress"]
    r = invoke(*args)
    assert r.exit_code == 2 and "pass --normalize none" in r.output
    r = invoke(*args, "--normalize", "none")                       # before: "holds another job's files"
    assert r.exit_code == 0 and "stopped before saving any result" in r.output, r.output


def test_an_unfinished_job_keeps_its_chunks_for_new_output_options_only(reference_mdf, tmp_path):
    out = tmp_path / "o"
    args = ["infer", reference_mdf, "--out", out, "--device", "cpu", "--no-progress", "--batch-size", "1000"]
    assert invoke(*args, "--keep-chunks").exit_code == 0
    for f in ("metrics.json", "predictions.csv"):                   # as a job killed while writing its files
        (out / f).unlink()
    r = invoke(*args, "--top-k", "2")
    assert r.exit_code == 0 and "10 saved chunk(s) are kept" in r.output and "resuming: 10 of 10" in r.output
    assert json.loads((out / "metrics.json").read_text())["chunks_resumed"] == 10
    other = tmp_path / "o2"
    args[args.index(out)] = other
    assert invoke(*args, "--keep-chunks").exit_code == 0
    (other / "metrics.json").unlink()
    r = invoke(*args, "--keep-chunks", "--normalize", "scale")     # other chunks: refused, never mixed
    assert r.exit_code == 2 and "different normalize" in r.output


def test_without_out_every_job_gets_a_folder_of_its_own(reference_mdf, mnist, tmp_path, monkeypatch):
    """Before: the default --out runs/infer made any second job clash."""
    monkeypatch.chdir(tmp_path)
    (_, _), (xte, _) = mnist
    np.save(tmp_path / "few.npy", xte[:30])
    base = ["infer", reference_mdf, "--device", "cpu", "--no-progress"]
    stem = reference_mdf.name.split(".")[0]
    first = invoke(*base)
    assert first.exit_code == 0 and f"runs/infer/{stem}-mnist-test\n" in first.output
    assert "complete already" in invoke(*base).output                        # the same job finds its folder
    r = invoke(*base, "--top-k", "3")
    assert r.exit_code == 0 and f"runs/infer/{stem}-mnist-test-2\n" in r.output
    r = invoke(*base, "--data", "few.npy")
    assert r.exit_code == 0 and f"runs/infer/{stem}-few\n" in r.output
    assert sorted(p.name for p in (tmp_path / "runs" / "infer").iterdir()) == \
        [f"{stem}-few", f"{stem}-mnist-test", f"{stem}-mnist-test-2"]


def test_a_mistyped_source_gets_a_suggestion(reference_mdf, tmp_path):
    r = invoke("infer", reference_mdf, "--data", "mnist:tset", "--out", tmp_path / "o", "--device", "cpu")
    assert r.exit_code == 2 and "mnist:tset: no such file or folder (did you mean mnist:test?)" in r.output
    np.save(tmp_path / "digits.npy", np.zeros((2, 28, 28), np.uint8))
    r = invoke("infer", reference_mdf, "--data", tmp_path / "digts.npy", "--out", tmp_path / "o", "--device", "cpu")
    assert r.exit_code == 2 and f"(did you mean {tmp_path / 'digits.npy'}?)" in r.output


# --------------------------------------------------------------------------- #
# Ctrl-C
# --------------------------------------------------------------------------- #
def _interruptible():
    """In the child, before exec: SIGINT as a terminal would deliver it (not ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_when_chunks(proc, chunk_dir, n=3, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if chunk_dir.exists() and len(list(chunk_dir.glob("*.npz"))) >= n:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the job ended before it could be interrupted: make it longer"
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=60)


def test_ctrl_c_stops_a_multi_item_job_and_a_single_one_with_130(reference_mdf, tmp_path):
    """Before: Ctrl-C failed the current item and went on to the next; a single infer exited 2.
    The children get SIGINT's default disposition back: a test run started in the background
    of a non-interactive shell inherits SIGINT *ignored*, and Python then never raises
    KeyboardInterrupt (the job ran to its end)."""
    cfg = tmp_path / "jobs.yaml"
    cfg.write_text(f"name: j\ninfer: {{device: cpu, batch_size: 100}}\njobs:\n"
                   f"  - {{model: {reference_mdf}, data: 'mnist:train', name: first}}\n"
                   f"  - {{model: {reference_mdf}, data: 'mnist:train', name: second}}\n")
    proc = subprocess.Popen([sys.executable, "-m", "gpu_mdf", "infer", "--config", str(cfg), "--out",
                             str(tmp_path / "jobs"), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible)
    stdout, stderr = _interrupt_when_chunks(proc, tmp_path / "jobs" / "first" / ".chunks")
    assert proc.returncode == 130, (stdout, stderr)
    assert "interrupted:" in stderr and "rerun the same command to resume" in stderr
    assert not (tmp_path / "jobs" / "second").exists() and "FAIL" not in stdout

    args = [sys.executable, "-m", "gpu_mdf", "infer", str(reference_mdf), "--data", "mnist:train",
            "--batch-size", "100", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "one")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_interruptible)
    stdout, stderr = _interrupt_when_chunks(proc, tmp_path / "one" / ".chunks")
    assert proc.returncode == 130 and "interrupted:" in stderr, (stdout, stderr)
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "resuming:" in r.stderr
