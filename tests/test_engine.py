import json

import numpy as np
import pytest

from gpu_mdf.engine import compile
from gpu_mdf.engine.backend import GpuProbe, select_backend
from gpu_mdf.engine.expr import compile_expr
from gpu_mdf.errors import CompileError, DataError, DeviceError


def one_node_model(node: dict, graph_extra=None) -> dict:
    g = {"nodes": {"n": node}}
    g.update(graph_extra or {})
    return {"m": {"format": "ModECI MDF v0.4", "graphs": {"g": g}}}


# -- safe expressions -------------------------------------------------------- #
@pytest.mark.parametrize("text", [
    "__import__('os').system('touch /tmp/pwned')",
    "x.__class__",
    "(lambda: 1)()",
    "[i for i in x]",
    "open('/etc/passwd')",
    "'abc'",
    "x if x else x",
    "exp(x, out=x)",
])
def test_hostile_expressions_are_refused(text):
    with pytest.raises(CompileError, match="refused MDF expression"):
        compile_expr(text, {"x"}, np)


def test_expression_arithmetic_and_functions():
    e = compile_expr("maximum(x, 0) @ W + b * (x[0, 0] > -1) - 2 ** 3", {"x", "W", "b"}, np)
    x, W, b = np.ones((2, 3)), np.ones((3, 2)), np.ones(2)
    assert e.deps == {"x", "W", "b"}
    np.testing.assert_allclose(e.fn({"x": x, "W": W, "b": b}), np.maximum(x, 0) @ W + b - 8)
    with pytest.warns(RuntimeWarning, match="overflow"):  # a float overflow, not a giant int
        assert compile_expr("10 ** 10 ** 10", set(), np).fn({}) == float("inf")


def test_hostile_mdf_file_runs_nothing(tmp_path):
    sentinel = tmp_path / "pwned"
    node = {"input_ports": {"x": {"shape": [1, 2]}},
            "parameters": {"evil": {"value": f"__import__('os').system('touch {sentinel}')"}},
            "output_ports": {"y": {"value": "x"}}}
    path = tmp_path / "evil.json"
    path.write_text(json.dumps(one_node_model(node)))
    with pytest.raises(CompileError, match="__import__"):
        compile(path, device="cpu")
    assert not sentinel.exists()


# -- graph checks -------------------------------------------------------------- #
def test_cycle_state_and_conditions_are_refused():
    a = {"input_ports": {"i": {}}, "output_ports": {"o": {"value": "i"}}}
    cyc = {"m": {"graphs": {"g": {"nodes": {"a": a, "b": a},
                                  "edges": {"e1": {"sender": "a", "receiver": "b", "sender_port": "o",
                                                   "receiver_port": "i"},
                                            "e2": {"sender": "b", "receiver": "a", "sender_port": "o",
                                                   "receiver_port": "i"}}}}}}
    with pytest.raises(CompileError, match="cycle.*EvaluableGraph"):
        compile(cyc, device="cpu")
    stateful = {"input_ports": {"x": {}}, "parameters": {"v": {"default_initial_value": 0,
                                                               "time_derivative": "x"}},
                "output_ports": {"y": {"value": "v"}}}
    with pytest.raises(CompileError, match="state"):
        compile(one_node_model(stateful), device="cpu")
    with pytest.raises(CompileError, match="conditions"):
        compile(one_node_model(a, {"conditions": {"node_specific": {"n": {"type": "Always"}}}}),
                device="cpu")
    selfref = {"input_ports": {"x": {}}, "parameters": {"v": {"value": "v + x"}},
               "output_ports": {"y": {"value": "v"}}}
    with pytest.raises(CompileError, match="depends on itself"):
        compile(one_node_model(selfref), device="cpu")


def test_unknown_function_and_argument():
    node = {"input_ports": {"x": {"shape": [1, 3]}}, "functions": {"f": {"function": "onnx::Nope",
                                                                      "args": {"X": "x"}}},
            "output_ports": {"y": {"value": "f"}}}
    with pytest.raises(CompileError, match="Nope"):
        compile(one_node_model(node), device="cpu")
    node["functions"]["f"] = {"function": "onnx::Relu", "args": {"X": "x", "bogus": 1}}
    with pytest.raises(CompileError, match="no argument 'bogus'"):
        compile(one_node_model(node), device="cpu")


def test_edge_weights_and_standard_functions():
    src = {"input_ports": {"x": {"shape": [1, 3]}}, "output_ports": {"o": {"value": "x"}}}
    dst = {"input_ports": {"i": {}},
           "functions": {"lin": {"function": "linear", "args": {"variable0": "i", "slope": 2,
                                                                "intercept": 1}}},
           "output_ports": {"y": {"value": "lin"}}}
    m = {"m": {"graphs": {"g": {"nodes": {"src": src, "dst": dst}, "edges": {"e": {
        "sender": "src", "sender_port": "o", "receiver": "dst", "receiver_port": "i",
        "parameters": {"weight": 3}}}}}}}
    p = compile(m, device="cpu")
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    np.testing.assert_allclose(p.run(x), (x * 3) * 2 + 1)


def test_wrong_input_shape_and_nan_are_clear_errors(reference_mdf):
    p = compile(reference_mdf, device="cpu")
    with pytest.raises(DataError, match=r"got shape \(2, 27, 28\).*\(N, 28, 28\)"):
        p.run(np.zeros((2, 27, 28), np.uint8))
    x = np.zeros((3, 28, 28), np.float32)
    x[1, 0, 0] = np.inf
    with pytest.raises(DataError, match="item 1"):
        p.run(x)


# -- backends -------------------------------------------------------------------- #
def test_backend_choice_and_messages():
    no = GpuProbe(False, "CuPy is not installed")
    b = select_backend("auto", probe=no)
    assert b.name == "numpy" and "CuPy is not installed" in b.reason
    assert select_backend("cpu").reason == "CPU requested"
    with pytest.raises(DeviceError, match="GPU was demanded.*not installed"):
        select_backend("gpu", probe=no)
    with pytest.raises(DeviceError, match="unknown device"):
        select_backend("tpu")
    with pytest.raises(DeviceError, match="unknown device"):
        select_backend("cpu:1")
    yes = GpuProbe(True, "1 device", cupy=np, devices=[{"name": "FakeGPU", "index": 0}])
    g = select_backend("auto", probe=yes)
    assert g.name == "cupy" and g.device == "gpu:0" and "FakeGPU" in g.reason
    with pytest.raises(DeviceError, match="no such GPU"):
        select_backend("gpu:3", probe=yes)


# -- numbers ------------------------------------------------------------------------ #
def test_reference_model_full_test_set_within_1e5(reference_model, reference_mdf, mnist, x_test_l2):
    model, _ = reference_model
    (_, _), (xte, yte) = mnist
    prog = compile(reference_mdf, device="cpu")
    assert prog.normalize == "l2" and prog.outputs[0].shape == (-1, 10)
    ours = np.concatenate([prog.run(c) for _, c in
                           __import__("gpu_mdf.data", fromlist=["x"]).open_dataset().chunks(2048)])
    ref = model.predict(x_test_l2, batch_size=10000, verbose=0)
    assert np.abs(ours - ref).max() < 1e-5
    assert np.array_equal(ours.argmax(1), ref.argmax(1))
    # float input already normalised gives the same numbers
    np.testing.assert_allclose(prog.run(x_test_l2[:100]), ours[:100], atol=1e-6)


def test_upstream_keras_to_mdf_files_run_and_match_evaluable_graph(reference_model, x_test_l2, tmp_path):
    """modeci_mdf's own importer bakes the batch into a parameter: as written, the graph is
    closed and evaluates once, like EvaluableGraph; ``inputs=`` feeds that parameter instead."""
    pytest.importorskip("tensorflow", reason="modeci_mdf's Keras importer imports tensorflow.keras")
    from modeci_mdf.execution_engine import EvaluableGraph
    from modeci_mdf.interfaces.keras import keras_to_mdf as upstream
    from modeci_mdf.utils import load_mdf

    model, _ = reference_model
    x = x_test_l2[:8]
    mdf, _ = upstream(model, x)
    path = tmp_path / "upstream.json"
    mdf.to_json_file(str(path))
    closed = compile(path, device="cpu")
    assert closed.inputs == []
    eg = EvaluableGraph(load_mdf(str(path)).graphs[0], verbose=False)
    eg.evaluate()
    theirs = eg.enodes[closed.outputs[0].node].evaluable_outputs[closed.outputs[0].port].curr_value
    np.testing.assert_allclose(closed.run(), theirs, atol=1e-5)
    prog = compile(path, device="cpu", inputs=["Input_in"])
    assert [p.name for p in prog.inputs] == ["Input_in"]
    np.testing.assert_allclose(prog.run(x), theirs, atol=1e-5)
    np.testing.assert_allclose(prog.run(x_test_l2[100:164]),
                               model.predict(x_test_l2[100:164], verbose=0), atol=1e-5)


def test_batch_size_suggestion_on_cpu(reference_mdf):
    p = compile(reference_mdf, device="cpu")
    assert p.bytes_per_item > 784 * 4
    assert p.suggest_batch_size() == 2048 and p.suggest_batch_size(100) == 100


def test_in_place_activations_never_clobber_inputs_or_shared_values():
    """Relu may reuse its input's memory only when that input is a fresh temporary
    with no other reader; the graph input and values read twice stay intact."""
    W = np.eye(3, dtype=np.float32).tolist()
    node = {"input_ports": {"x": {"shape": [1, 3]}},
            "parameters": {"W": {"value": W}},
            "functions": {"id": {"function": "onnx::Identity", "args": {"input": "x"}},
                          "r0": {"function": "onnx::Relu", "args": {"X": "id"}},     # a view of x
                          "g": {"function": "onnx::MatMul", "args": {"A": "x", "B": "W"}},
                          "r1": {"function": "onnx::Relu", "args": {"X": "g"}},      # g also an output
                          "g2": {"function": "onnx::MatMul", "args": {"A": "x", "B": "W"}},
                          "r2": {"function": "onnx::Relu", "args": {"X": "g2"}}},    # may be in place
            "output_ports": {"o0": {"value": "r0"}, "o1": {"value": "r1"}, "og": {"value": "g"},
                             "o2": {"value": "r2"}}}
    p = compile(one_node_model(node), device="cpu")
    x = np.array([[-1.0, 2.0, -3.0]], np.float32)
    keep = x.copy()
    out = p.run(x)
    np.testing.assert_array_equal(x, keep)
    np.testing.assert_array_equal(out["og"], keep)              # not overwritten by r1
    for k in ("o0", "o1", "o2"):
        np.testing.assert_array_equal(out[k], np.maximum(keep, 0))
    assert {name for _, name in p.step_names()} == {"id", "r0", "g", "r1", "g2", "r2"}
    assert p.step_names(inplace_only=True) == {("n", "r2")}


def test_channel_axis_of_size_one_is_added_not_an_error(tmp_path):
    """A CNN taking (N, 28, 28, 1) reads the usual (N, 28, 28) pixels; other shapes stay errors."""
    node = {"input_ports": {"x": {"shape": [1, 28, 28, 1]}},
            "functions": {"f": {"function": "onnx::Flatten", "args": {"input": "x"}}},
            "output_ports": {"y": {"value": "f"}}}
    p = compile(one_node_model(node, {"metadata": {"gpu_mdf": {"normalize": "scale"}}}), device="cpu")
    x = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    np.testing.assert_allclose(p.run(x.astype(np.uint8)), (x.reshape(2, -1) % 256) / 255.0, rtol=1e-6)
    with pytest.raises(DataError, match=r"got shape \(2, 28, 27\)"):
        p.run(np.zeros((2, 28, 27), np.uint8))


def test_in_place_across_nodes_only_for_private_single_use_values():
    def relu_node(port):
        return {"input_ports": {port: {}}, "functions": {"r": {"function": "onnx::Relu", "args": {"X": port}}},
                "output_ports": {f"{port}_o": {"value": "r"}}}
    W = (np.eye(3, dtype=np.float32) * -1).tolist()
    nodes = {
        "mm": {"input_ports": {"x": {"shape": [1, 3]}}, "parameters": {"W": {"value": W}},
               "functions": {"g": {"function": "onnx::MatMul", "args": {"A": "x", "B": "W"}},
                             "t": {"function": "onnx::Transpose", "args": {"data": "g", "perm": [0, 1]}}},
               "output_ports": {"mm_o": {"value": "t"}}},
        "a": relu_node("a_in"),      # mm_o feeds a and b: shared, so neither may write into it
        "b": relu_node("b_in"),
        "c": relu_node("c_in"),      # fed by a_o alone, but a_o is also a graph output
        "d": relu_node("d_in"),      # fed by b_o alone: private, may go in place
        "e": relu_node("e_in"),      # a weighted edge from b_o: the product is new memory
    }
    def edge(s, sp, r, rp, w=None):
        e = {"sender": s, "sender_port": sp, "receiver": r, "receiver_port": rp}
        if w is not None:
            e["parameters"] = {"weight": w}
        return e
    edges = {"1": edge("mm", "mm_o", "a", "a_in"), "2": edge("mm", "mm_o", "b", "b_in"),
             "3": edge("a", "a_in_o", "c", "c_in"), "4": edge("b", "b_in_o", "d", "d_in"),
             "5": edge("mm", "mm_o", "e", "e_in", -2)}
    meta = {"gpu_mdf": {"outputs": ["mm_o", "a_in_o", "c_in_o", "d_in_o", "e_in_o"]}}
    model = {"m": {"graphs": {"g": {"nodes": nodes, "edges": edges, "metadata": meta}}}}
    p = compile(model, device="cpu", optimize=False)      # the in-place planner on the graph as written
    x = np.array([[1.0, -2.0, 3.0]], np.float32)
    out = p.run(x)
    mm = -x
    np.testing.assert_array_equal(out["mm_o"], mm)
    for k in ("a_in_o", "c_in_o", "d_in_o"):
        np.testing.assert_array_equal(out[k], np.maximum(mm, 0), err_msg=k)
    np.testing.assert_array_equal(out["e_in_o"], np.maximum(mm * -2, 0))
    assert p.step_names(inplace_only=True) == {("d", "r"), ("e", "r")}


def test_inference_path_imports_no_tensorflow(reference_mdf, tmp_path):
    import subprocess
    import sys
    code = ("import sys\nfrom gpu_mdf.cli import main\n"
            f"sys.argv = ['gpu-mdf', 'infer', {str(reference_mdf)!r}, '--out', {str(tmp_path / 'o')!r},"
            " '--device', 'cpu', '--no-progress']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'modeci_mdf'))\n"
            "print('IMPORTED', bad)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "IMPORTED []" in r.stdout


def test_attribute_given_by_a_parameter_name():
    """An attribute may name a constant parameter (``perm: "order"``), as ONNX-derived MDF does."""
    node = {"input_ports": {"x": {"shape": [1, 2, 3]}},
            "parameters": {"order": {"value": [0, 2, 1]}},
            "functions": {"t": {"function": "onnx::Transpose", "args": {"data": "x", "perm": "order"}}},
            "output_ports": {"y": {"value": "t"}}}
    p = compile(one_node_model(node), device="cpu")
    x = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    np.testing.assert_array_equal(p.run(x), x.transpose(0, 2, 1))


def test_array_edge_weights_broadcast():
    src = {"input_ports": {"x": {"shape": [1, 3]}}, "output_ports": {"o": {"value": "x"}}}
    dst = {"input_ports": {"i": {}}, "output_ports": {"y": {"value": "i"}}}
    m = {"m": {"graphs": {"g": {"nodes": {"src": src, "dst": dst}, "edges": {"e": {
        "sender": "src", "sender_port": "o", "receiver": "dst", "receiver_port": "i",
        "parameters": {"weight": [1.0, -2.0, 0.5]}}}}}}}
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    np.testing.assert_allclose(compile(m, device="cpu").run(x), x * [1.0, -2.0, 0.5])


@pytest.mark.parametrize("value", ["[0] * 30000000", "[[0] * 3000] * 10000", "[0, 1] + [2] * 10 ** 8",
                                   "-[0] * 100000000"])
def test_hostile_literals_are_refused_cheaply(value):
    """List repetition would build the list before anything could check its size: refused
    when the expression is parsed, before anything is computed or allocated."""
    import time
    import tracemalloc
    node = {"input_ports": {"x": {"shape": [1, 2]}}, "parameters": {"p": {"value": value}},
            "output_ports": {"y": {"value": "x"}}}
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(CompileError, match="list literal"):
        compile(one_node_model(node), device="cpu")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0 and peak < (20 << 20)


def test_folded_constants_are_bounded():
    node = {"input_ports": {"x": {"shape": [1, 2]}},
            "parameters": {"shape": {"value": [20000, 20000]},
                           "big": {"function": "onnx::ConstantOfShape", "args": {"input": "shape"}},
                           "tiled": {"function": "onnx::Tile", "args": {"input": "x", "repeats": [1, 10 ** 9]}}},
            "output_ports": {"y": {"value": "big"}, "z": {"value": "tiled"}}}
    with pytest.raises(CompileError, match="exceeds the compile-time limit"):
        compile(one_node_model(node), device="cpu")


def test_a_runtime_tile_of_absurd_size_is_refused_at_compile_time():
    node = {"input_ports": {"x": {"shape": [1, 2]}},
            "parameters": {"tiled": {"function": "onnx::Tile", "args": {"input": "x", "repeats": [1, 10 ** 9]}}},
            "output_ports": {"z": {"value": "tiled"}}}
    with pytest.raises(CompileError, match="exceeds the compile-time limit"):
        compile(one_node_model(node), device="cpu")


def test_cpu_blocks_a_little_larger_than_block_size_do_not_deadlock(monkeypatch):
    """Blocks are equal parts of the batch, so one can be a little over block_size; running
    it must not block it again on the same thread pool (which deadlocked)."""
    import threading
    from pathlib import Path

    from gpu_mdf.engine.program import Program
    prog = compile(Path(__file__).resolve().parents[1] / "examples" / "mnist_softmax.mdf.json", device="cpu")
    x = np.random.default_rng(0).integers(0, 256, (97, 28, 28)).astype(np.uint8)
    whole = prog.run(x)
    monkeypatch.setattr(Program, "block_size", property(lambda self: 4))   # 97 items: 24 blocks, one of 5
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("y", prog.run(x, threads=2)), daemon=True)
    t.start()
    t.join(30)
    assert "y" in out, "blocked run did not finish (nested blocking on the pool)"
    np.testing.assert_allclose(out["y"], whole, atol=1e-5, rtol=1e-5)   # BLAS may block a GEMM differently


@pytest.mark.parametrize("n, block, sizes", [(9, 2, [2, 2, 2, 3]), (97, 4, [4] * 23 + [5]), (32, 11, [16, 16]),
                                              (10, 3, [2, 3, 2, 3])])
def test_cpu_blocks_are_an_even_number_of_near_equal_parts(n, block, sizes, monkeypatch):
    """A batch runs as an even number of blocks (from its size alone), sizes differing by one
    at most, in order; the values are the whole batch's."""
    from pathlib import Path

    from gpu_mdf.engine.program import Program
    prog = compile(Path(__file__).resolve().parents[1] / "examples" / "mnist_softmax.mdf.json", device="cpu")
    x = np.random.default_rng(0).integers(0, 256, (n, 28, 28)).astype(np.uint8)
    whole = prog.run(x)
    monkeypatch.setattr(Program, "block_size", property(lambda self: block))
    seen, real = [], Program._run_whole
    monkeypatch.setattr(Program, "_run_whole",
                        lambda self, part, **kw: seen.append(len(part)) or real(self, part, **kw))
    got = prog.run(x, threads=1)
    assert seen == sizes
    np.testing.assert_allclose(got, whole, atol=1e-5, rtol=1e-5)


def _yaml_bomb(levels: int = 9) -> str:
    """A YAML MDF file of about 2 KB whose weight, read with aliases expanded, has 10**levels values."""
    lines = ["a0: &a0 [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    anchors = "\n".join("  " + ln for ln in lines)
    return f"""bomb:
  format: ModECI MDF v0.4
  metadata:
{anchors}
  graphs:
    g:
      nodes:
        n:
          input_ports: {{x: {{shape: [1, 2]}}}}
          parameters:
            w: {{value: *a{levels - 1}}}
          functions:
            y: {{function: onnx::Add, args: {{A: x, B: w}}}}
          output_ports: {{out: {{value: y}}}}
"""


def test_yaml_aliases_are_refused_in_milliseconds_without_allocating(tmp_path):
    """PyYAML shares an aliased list instead of copying it, so a 2 KB file can describe a
    billion numbers; the size is counted through the shared lists before any array is made."""
    import time
    import tracemalloc
    path = tmp_path / "bomb.mdf.yaml"
    path.write_text(_yaml_bomb())
    assert path.stat().st_size < 2500
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(CompileError, match="expands to 1,000,000,000"):
        compile(path, device="cpu")
    seconds, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 0.5 and peak < (20 << 20), (seconds, peak)


def test_a_small_file_cannot_fold_into_a_large_constant():
    """Growth is bounded: Expand of one value to 27M (a 3.8 KB file once compiled into 462 MB)."""
    node = {"input_ports": {"x": {"shape": [1, 2]}},
            "parameters": {"one": {"value": [1.5]}, "shape": {"value": [3000, 3000, 3]},
                           "big": {"function": "onnx::Expand", "args": {"input": "one", "shape": "shape"}},
                           "outer": {"function": "onnx::Mul", "args": {"A": "col", "B": "row"}},
                           "col": {"value": [[0.5]] * 3000}, "row": {"value": [[0.5] * 3000]}},
            "output_ports": {"y": {"value": "big"}}}
    with pytest.raises(CompileError, match="exceeds the compile-time limit"):
        compile(one_node_model(node), device="cpu")
    node["output_ports"] = {"y": {"value": "outer"}}          # a 3000x3000 outer product of 6000 values
    del node["parameters"]["big"]
    with pytest.raises(CompileError, match="outer .* exceeds the compile-time limit"):
        compile(one_node_model(node), device="cpu")


def test_the_callers_arrays_are_trusted_data_of_any_size():
    """Bound weights are what the caller already holds: folding them (a transpose, a
    BatchNorm into a weight) grows nothing, whatever their size (VGG's 102M-value layer)."""
    big = np.full((2, 40_000_000), 0.5, np.float32)             # 80M values, over every old limit
    node = {"input_ports": {"x": {"shape": [1, 2], "type": "float32"}, "w": {"shape": [2, 40_000_000]}},
            "parameters": {"w2": {"function": "onnx::Mul", "args": {"A": "w", "B": 2.0}},
                           "y": {"function": "onnx::MatMul", "args": {"A": "x", "B": "w2"}}},
            "output_ports": {"out": {"value": "y"}}}
    prog = compile(one_node_model(node), device="cpu", constants={"w": big})
    out = prog.run(np.ones((1, 2), np.float32))
    assert out.shape == (1, 40_000_000) and float(out[0, 0]) == 2.0
