"""CUDA graphs (``compile(..., cuda_graphs=True)``), on the strict CuPy stand-in, which
models stream capture: operations recorded, not run (what a capture allocates is poisoned
with NaN at its end), syncs and host copies refused inside it, ``Graph.launch`` replaying
the record into the same buffers as one launch.

Every golden case runs eagerly and through its graph on batches of different values: the
same bits, or eager execution with the reason capture was refused."""


import numpy as np
import pytest
from golden_corpus import CASES as ALL
from golden_corpus import GOLDEN
from golden_corpus import load as _load

from gpu_mdf.engine import compile
from gpu_mdf.errors import CompileError

# the cases fed per batch (a closed graph, without inputs, evaluates once: nothing to replay)
CASES = [n for n in ALL if _load(n)[1]]


def golden(name):
    return _load(name)[:3]


def batches(feeds, n=4):
    """``n`` batches of the feeds' shapes with different values (integers kept in range)."""
    r = np.random.default_rng(0)
    out = []
    for k in range(n):
        b = {}
        for name, v in feeds.items():
            if v.dtype.kind == "f":
                b[name] = (v * (1 + 0.25 * k) + r.standard_normal(v.shape) * 0.1 * k).astype(v.dtype)
            else:
                b[name] = np.roll(v, k, axis=0) if v.ndim else v
        out.append(b)
    return out


def as_dict(prog, out):
    return out if isinstance(out, dict) else {prog.outputs[0].name: out}


def test_the_corpus_is_fed():
    assert len(CASES) >= 110


@pytest.mark.parametrize("name", CASES)
def test_replays_give_eager_bits_on_the_golden_corpus(name, strict_gpu):
    import fake_cupy
    path, feeds, consts = golden(name)
    eager = compile(path, device=strict_gpu, constants=consts)
    graphs = compile(path, device=strict_gpu, constants=consts, cuda_graphs=True)
    launches = []
    for b in batches(feeds):
        want = as_dict(eager, eager.run(b))
        prepared = graphs._feeds(b, True)            # normalising pixels: kernels before the program's
        fake_cupy.COUNT.reset()
        got = graphs.execute(prepared)
        launches.append(fake_cupy.COUNT.launches)
        got = {k: v.get() if isinstance(v, fake_cupy.ndarray) else v for k, v in got.items()}
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=f"{name} {k}")
    cg = graphs.cuda_graphs
    if cg.never or cg.refused:
        assert "CUDA graphs: " in graphs.describe() and (cg.never or next(iter(cg.refused.values())))
        assert not cg.graphs
    else:
        assert cg.captures == 1 and cg.replays == 2, graphs.describe()
        # a replay: the inputs copied in, one graph launch, the outputs copied out
        assert launches[2] == launches[3] == len(feeds) + 1 + len(graphs.outputs)


def test_a_replay_takes_three_launches_where_the_cnn_takes_many(strict_gpu):
    import fake_cupy
    path, feeds, consts = golden("pytorch-style-cnn_pool")
    eager = compile(path, device=strict_gpu, constants=consts)
    graphs = compile(path, device=strict_gpu, constants=consts, cuda_graphs=True)
    b = batches(feeds, 3)
    for x in b:
        graphs.run(x)
    fake_cupy.COUNT.reset()
    eager.run(b[0])
    many = fake_cupy.COUNT.launches
    fake_cupy.COUNT.reset()
    graphs.run(b[1])
    assert fake_cupy.COUNT.launches == 3 < many
    assert ("launch", next(w for k, w in fake_cupy.COUNT.log if w.startswith("graph launch"))) in fake_cupy.COUNT.log
    assert fake_cupy.COUNT.d2h_syncs == 1          # the result's one copy back
    fake_cupy.COUNT.reset()
    graphs.run(b[2])
    assert fake_cupy.COUNT.new_bytes == 0          # steady state: the pool's blocks reused
    assert "CUDA graphs: 1 captured, 3 replays" in graphs.describe()
    # the capture (second batch) allocated from a pool of its own
    fake_cupy.COUNT.reset()
    again = compile(path, device=strict_gpu, constants=consts, cuda_graphs=True)
    again.run(b[0])
    again.run(b[1])
    log = fake_cupy.COUNT.log
    at = {e: log.index(e) for e in (("allocator", "enter"), ("capture", "begin"), ("allocator", "exit"))}
    assert at[("allocator", "enter")] < at[("capture", "begin")] < at[("allocator", "exit")]


def test_each_input_signature_has_its_own_graph(strict_gpu):
    path, feeds, consts = golden("example-mnist_softmax")
    name, x = next(iter(feeds.items()))
    eager = compile(path, device=strict_gpu, constants=consts)
    graphs = compile(path, device=strict_gpu, constants=consts, cuda_graphs=True)
    for n in (16, 7, 16, 7, 16, 7):
        part = {name: x[:n]}
        np.testing.assert_array_equal(graphs.run(part), eager.run(part))
    assert len(graphs.cuda_graphs.graphs) == 2 and graphs.cuda_graphs.replays == 2


def test_a_capture_that_cuda_refuses_runs_eagerly_and_says_why(strict_gpu, monkeypatch):
    """A sync inside the loop that the plan did not foresee (here, injected): CUDA refuses
    it during capture; the capture is ended and discarded, the batch runs eagerly."""
    import fake_cupy
    path, feeds, consts = golden("keras-Dense")
    graphs = compile(path, device=strict_gpu, constants=consts, cuda_graphs=True)
    eager = compile(path, device=strict_gpu, constants=consts)
    key, fn, release, what = graphs._steps[0]

    def syncs(env):
        v = fn(env)
        float(v.reshape(-1)[0])              # a device->host read
        return v
    graphs._steps[0] = (key, syncs, release, what)
    for b in batches(feeds, 3):
        np.testing.assert_array_equal(graphs.run(b), eager.run(b))
    cg = graphs.cuda_graphs
    assert not cg.graphs and "cudaErrorStreamCaptureUnsupported" in next(iter(cg.refused.values()))
    assert not fake_cupy.Stream._current and not fake_cupy._CAPTURE.stream    # the capture was ended
    assert "eager for 1 signature(s): capture failed" in graphs.describe()


def test_a_plan_that_syncs_per_batch_is_never_captured(strict_gpu):
    path, feeds, consts = golden("example-mnist_softmax")
    graphs = compile(path, device=strict_gpu, constants=consts, cuda_graphs=True)
    graphs.plan.syncs.append("a value read back (injected)")
    from gpu_mdf.engine.graphs import CudaGraphs
    graphs.cuda_graphs = CudaGraphs(graphs)
    for b in batches(feeds, 3):
        graphs.run(b)
    assert not graphs.cuda_graphs.graphs
    assert "CUDA graphs: not used (it fetches a device value per batch (a value read back" in graphs.describe()


def test_the_stand_in_poisons_what_a_capture_computed(strict_gpu):
    """The model itself: reading a captured result without launching the graph gives NaN,
    so the engine's replay path cannot pass by reading capture-time values."""
    import fake_cupy as cp
    s = cp.cuda.Stream(non_blocking=True)
    x = cp.asarray(np.arange(4, dtype=np.float32))
    with s:
        s.begin_capture()
        y = cp.exp(x) + 1
        with pytest.raises(cp.CUDARuntimeError, match="not permitted when the stream is capturing"):
            y.get()
        g = s.end_capture()
    assert np.isnan(y.get()).all()
    g.launch(s)
    np.testing.assert_array_equal(y.get(), np.exp(np.arange(4, dtype=np.float32)) + 1)
    x[...] = 0
    g.launch(s)
    np.testing.assert_array_equal(y.get(), np.full(4, 2, np.float32))
    with pytest.raises(RuntimeError, match="default"):
        cp._null_stream.begin_capture()


def test_cuda_graphs_are_refused_on_the_cpu():
    with pytest.raises(CompileError, match="CUDA graphs need a GPU; this program runs on cpu"):
        compile(GOLDEN / "example-mnist_softmax.mdf.json", device="cpu", cuda_graphs=True)


def test_bulk_inference_through_cuda_graphs_writes_the_eager_files(strict_gpu, reference_mdf, tmp_path):
    """``infer --cuda-graphs`` on a GPU: chunks of one size replay one graph (the last,
    shorter chunk runs eagerly); every file is byte for byte the eager job's."""
    from gpu_mdf.infer import run_inference
    quiet = {"progress": False, "log": lambda *_: None, "batch_size": 1500}
    eager = run_inference(reference_mdf, tmp_path / "eager", program=compile(reference_mdf, device=strict_gpu),
                          **quiet)
    prog = compile(reference_mdf, device=strict_gpu, cuda_graphs=True)
    graphs = run_inference(reference_mdf, tmp_path / "graphs", program=prog, **quiet)
    assert graphs.n == eager.n == 10000
    # 7 chunks: 6 of 1,500 (eager, captured, 4 replays) and one of 1,000 (eager)
    assert prog.cuda_graphs.captures == 1 and prog.cuda_graphs.replays == 4
    for name in ("predictions.csv", "probabilities.npy"):
        assert (tmp_path / "graphs" / name).read_bytes() == (tmp_path / "eager" / name).read_bytes(), name


def test_infer_refuses_cuda_graphs_without_a_gpu(reference_mdf, tmp_path):
    from click.testing import CliRunner

    from gpu_mdf.cli import main
    r = CliRunner().invoke(main, ["infer", str(reference_mdf), "--device", "cpu", "--cuda-graphs",
                                  "--out", str(tmp_path / "o"), "--no-progress"])
    assert r.exit_code != 0
    assert "CUDA graphs need a GPU; this program runs on cpu" in r.output
    assert not (tmp_path / "o" / "predictions.csv").exists()


def test_device_constants_missing_at_capture_wait_for_the_next_batch(strict_gpu):
    """A cached device constant (AveragePool's counts) dropped between the eager batch and
    the capture: a copy from the host inside the capture would read a staging buffer that
    is reused later, so the capture stops, the batch runs eagerly (filling the cache) and
    the next one captures; the graph then holds the constants it reads, so the cache may
    drop them again."""
    from gpu_mdf.engine import ops
    path, feeds, consts = golden("keras-AveragePooling2D-same")
    eager = compile(path, device=strict_gpu, constants=consts)
    graphs = compile(path, device=strict_gpu, constants=consts, cuda_graphs=True)
    bs = batches(feeds, 5)
    np.testing.assert_array_equal(graphs.run(bs[0]), eager.run(bs[0]))
    ops._DEVICE_CACHE.clear()
    np.testing.assert_array_equal(graphs.run(bs[1]), eager.run(bs[1]))    # capture stopped: eager
    cg = graphs.cuda_graphs
    assert not cg.graphs and not cg.refused                                 # not a refusal
    np.testing.assert_array_equal(graphs.run(bs[2]), eager.run(bs[2]))    # captured now
    (g,) = cg.graphs.values()
    assert g.consts
    ops._DEVICE_CACHE.clear()
    for b in bs[3:]:
        np.testing.assert_array_equal(graphs.run(b), eager.run(b))
    assert cg.replays == 2


@pytest.mark.parametrize("error", [KeyboardInterrupt, MemoryError])
def test_an_interrupted_capture_leaves_nothing_capturing(strict_gpu, error):
    import fake_cupy
    path, feeds, consts = golden("keras-Dense")
    graphs = compile(path, device=strict_gpu, constants=consts, cuda_graphs=True)
    bs = batches(feeds, 3)
    graphs.run(bs[0])
    key, fn, release, what = graphs._steps[0]

    def fails(env):
        raise error()
    graphs._steps[0] = (key, fails, release, what)
    if error is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            graphs.run(bs[1])
    else:                   # out of memory in the capture: this batch retries eagerly (and fails there too)
        with pytest.raises(MemoryError):
            graphs.run(bs[1])
    assert fake_cupy._CAPTURE.stream is None and not fake_cupy.Stream._current
    graphs._steps[0] = (key, fn, release, what)
    eager = compile(path, device=strict_gpu, constants=consts)
    np.testing.assert_array_equal(graphs.run(bs[2]), eager.run(bs[2]))
    assert graphs.cuda_graphs.graphs and not graphs.cuda_graphs.refused     # captured on the next try


def test_a_batch_error_during_capture_is_not_a_refusal(strict_gpu):
    from gpu_mdf.engine.ops import OpError
    from gpu_mdf.errors import DataError
    path, feeds, consts = golden("keras-Dense")
    graphs = compile(path, device=strict_gpu, constants=consts, cuda_graphs=True)
    bs = batches(feeds, 3)
    graphs.run(bs[0])
    key, fn, release, what = graphs._steps[-1]
    calls = []

    def refuses_once(env):
        calls.append(1)
        if len(calls) <= 2:                 # the capture, then the eager rerun of the same batch
            raise OpError("a value refused at run time")
        return fn(env)
    graphs._steps[-1] = (key, refuses_once, release, what)
    with pytest.raises(DataError, match="a value refused at run time"):
        graphs.run(bs[1])
    assert not graphs.cuda_graphs.refused
    graphs.run(bs[2])
    assert graphs.cuda_graphs.graphs
