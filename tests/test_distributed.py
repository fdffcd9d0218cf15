"""Bulk inference on a Dask cluster (loopback only): same bytes as one process,
a killed worker, a killed job resumed, an unreachable scheduler."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

distributed = pytest.importorskip("distributed")

from gpu_mdf.cli import main  # noqa: E402
from gpu_mdf.infer import run_inference  # noqa: E402

FILES = ("probabilities.npy", "predictions.csv")


@pytest.fixture(scope="module")
def train_npy(tmp_path_factory, mnist):
    """30,000 images as .npy: enough chunks to interrupt a job in the middle."""
    (xtr, ytr), _ = mnist
    d = tmp_path_factory.mktemp("data")
    np.save(d / "x.npy", xtr[:30000])
    np.save(d / "y.npy", ytr[:30000])
    return d / "x.npy", d / "y.npy"


@pytest.fixture(scope="module")
def single(reference_mdf, train_npy, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    run_inference(reference_mdf, out, source=train_npy[0], labels=train_npy[1], device="cpu", batch_size=250,
                  progress=False, log=lambda *_: None)
    return out


def same_files(a, b):
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in FILES)


def chunk_count(out):
    d = out / ".chunks"
    return len(list(d.glob("*.npz"))) if d.exists() else 0


def test_local_cluster_gives_the_single_process_bytes(reference_mdf, train_npy, single, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["infer", str(reference_mdf), "--data", str(train_npy[0]), "--labels",
                                  str(train_npy[1]), "--out", str(out), "--cluster", "local:2",
                                  "--batch-size", "250", "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert same_files(out, single)
    m = json.loads((out / "metrics.json").read_text())
    assert m["cluster"]["kind"] == "local:2" and m["cluster"]["workers"] == 2
    assert sum(w["chunks"] for w in m["cluster"]["per_worker"].values()) == 120
    assert all(w["images_per_s"] > 0 for w in m["cluster"]["per_worker"].values())
    assert "dashboard" in r.output


def test_a_killed_worker_costs_only_its_chunks(reference_mdf, train_npy, single, tmp_path):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)
        out = tmp_path / "out"
        result, error = {}, {}

        def job():
            try:
                result["r"] = run_inference(reference_mdf, out, source=train_npy[0], labels=train_npy[1],
                                            device="cpu", batch_size=250, progress=False, keep_chunks=True,
                                            log=lambda *_: None, cluster=cluster.scheduler_address)
            except BaseException as e:  # noqa: BLE001 - reported below
                error["e"] = e

        t = threading.Thread(target=job)
        t.start()
        deadline = time.time() + 60
        while chunk_count(out) < 10 and time.time() < deadline:
            time.sleep(0.005)
        victim = next(iter(pids.values()))
        os.kill(victim, signal.SIGKILL)
        at_kill = chunk_count(out)
        t.join(120)
        assert not error, error
        assert 10 <= at_kill < 120, "the worker must die in the middle of the job"
        assert chunk_count(out) == 120
        client.wait_for_workers(2, timeout=30)
        assert victim not in client.run(os.getpid).values()   # the nanny started a new worker
    assert same_files(out, single)
    workers = json.loads((out / "metrics.json").read_text())["cluster"]["per_worker"]
    assert sum(w["chunks"] for w in workers.values()) == 120


def test_a_killed_job_resumes_on_the_cluster(reference_mdf, train_npy, single, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "gpu_mdf", "infer", str(reference_mdf), "--data", str(train_npy[0]),
            "--labels", str(train_npy[1]), "--out", str(out), "--cluster", "local:2", "--batch-size", "250",
            "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 90
    while chunk_count(out) < 10 and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)   # the job and its workers
    proc.wait()
    done = chunk_count(out)
    assert 10 <= done < 120
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resuming:" in r.stderr
    assert same_files(out, single)


def test_unreachable_scheduler_is_one_line_and_writes_nothing(reference_mdf, tmp_path):
    out = tmp_path / "never"
    t0 = time.time()
    r = CliRunner().invoke(main, ["infer", str(reference_mdf), "--out", str(out), "--cluster",
                                  "tcp://127.0.0.1:9", "--cluster-timeout", "1", "--no-progress"])
    assert r.exit_code == 2
    assert r.output.startswith("error: cannot reach the Dask scheduler at tcp://127.0.0.1:9")
    assert r.output.count("\n") == 1
    assert not out.exists()
    assert time.time() - t0 < 30


def test_bad_cluster_spec():
    r = CliRunner().invoke(main, ["infer", "x.json", "--cluster", "locale"])
    assert r.exit_code == 2 and "expected local, local:N, cuda or a scheduler address" in r.output
