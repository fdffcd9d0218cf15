#!/usr/bin/env python
"""GPU benchmark for the prepared check (needs NumPy and CuPy only).

    python scripts/gpu_bench.py BUNDLE_DIR [--images 1000000]

For every model of the bundle, one table row:

* agreement with the NumPy backend on 2,048 items (max |difference|, argmax agreement);
* **device-resident** images/s: the input already normalised on the device, the program
  run ``REPS`` times back to back and timed with CUDA events around all of them (one
  synchronisation at the end), as the median of 5 such timings;
* **end to end** images/s: host arrays (uint8 pixels for MNIST models) streamed through
  ``Program.run_many`` (pinned staging, overlapped copies, results back on the host),
  the median of 3 passes over ``--images`` items;
* the opt-in precisions (``compile(precision="fp16" | "tf32")``): device-resident images/s
  and their agreement with the float32 GPU program (reported; float32 alone decides the
  exit status);
* CUDA graphs (``compile(cuda_graphs=True)``): whether the batch was captured (or why
  not), device-resident images/s of the replays, and their difference from eager
  execution (float rounding at most: cuBLAS may choose another algorithm inside a capture;
  more than 1e-4 fails the check).

Medians, never best-of; nothing is extrapolated from a single batch.
"""

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bundle  # noqa: E402

REPS = 20


def device_resident(prog, x_dev, reps=REPS, rounds=5) -> float:
    """Seconds per batch: ``reps`` executions between two CUDA events, median of rounds."""
    xp = prog.xp
    feeds = {prog.primary_input.name: x_dev}
    prog.execute(feeds)
    prog.backend.synchronize()
    times = []
    for _ in range(rounds):
        start, end = xp.cuda.Event(), xp.cuda.Event()
        start.record()
        for _ in range(reps):
            prog.execute(feeds)
        end.record()
        end.synchronize()
        times.append(xp.cuda.get_elapsed_time(start, end) / 1e3 / reps)
    return statistics.median(times)


def end_to_end(prog, host, chunk, rounds=3) -> float:
    """Seconds for all of ``host`` through the overlapped stream, median of rounds."""
    chunks = [host[i:i + chunk] for i in range(0, len(host), chunk)]
    list(prog.run_many(iter(chunks[:2])))       # warm-up: pinned buffers, kernels compiled
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in prog.run_many(iter(chunks)):
            pass
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(entry, n: int, device="gpu", reps=REPS, rounds=(5, 3)) -> dict:
    """One model. ``device`` may be a Backend (the tests pass the CuPy stand-in, with
    fewer repetitions)."""
    cpu = gpu_bundle.compiled(entry, "cpu")
    gpu = gpu_bundle.compiled(entry, device)
    x = gpu_bundle.data(entry, cpu, 2048)
    a, b = np.asarray(gpu.run(x)), np.asarray(cpu.run(x))
    diff = float(np.abs(a - b).max())
    agree = float((a.reshape(len(a), -1).argmax(1) == b.reshape(len(b), -1).argmax(1)).mean())
    bs = gpu.suggest_batch_size(min(n, 1 << 16))
    xb = gpu_bundle.data(entry, cpu, bs)
    t_dev = device_resident(gpu, gpu.prepare(xb), reps, rounds[0])
    host = gpu_bundle.data(entry, cpu, n)
    chunk = min(bs, 1 << 17)
    t_e2e = end_to_end(gpu, host, chunk, rounds[1])
    precisions = {}
    for precision in ("fp16", "tf32"):
        p = gpu_bundle.compiled(entry, device, precision=precision)
        c = np.asarray(p.run(x), np.float64)          # float inputs are cast to the program's type
        precisions[precision] = {
            "max_abs_diff_vs_fp32": float(np.abs(c - a).max()),
            "argmax_agreement": float((c.reshape(len(c), -1).argmax(1) == a.reshape(len(a), -1).argmax(1)).mean()),
            "device_resident_images_per_s": bs / device_resident(p, p.prepare(xb), reps, rounds[0])}
    gg = gpu_bundle.compiled(entry, device, cuda_graphs=True)
    xg = gg.prepare(xb)
    eager_out = np.asarray(gpu.backend.to_host(next(iter(gpu.execute({gpu.primary_input.name: gpu.prepare(xb)})
                                                          .values()))))
    t_graph = device_resident(gg, xg, reps, rounds[0])       # its first runs capture; the timed ones replay
    graph_out = np.asarray(gg.backend.to_host(next(iter(gg.execute({gg.primary_input.name: xg}).values()))))
    cg = gg.cuda_graphs
    graphs = {"captured": bool(cg.graphs), "why_not": cg.never or next(iter(cg.refused.values()), None),
              "replays": cg.replays, "max_abs_diff_vs_eager": float(np.abs(graph_out - eager_out).max()),
              "device_resident_images_per_s": bs / t_graph}
    return {"model": entry["name"], "images": n, "max_abs_diff_vs_numpy": diff, "argmax_agreement": agree,
            "batch": bs, "device_resident_images_per_s": bs / t_dev, "chunk": chunk,
            "end_to_end_images_per_s": n / t_e2e, "input_dtype": str(host.dtype), "gpu": gpu.backend.reason,
            "precisions": precisions, "cuda_graphs": graphs}


def main(argv):
    from gpu_mdf.engine.backend import probe_gpu
    probe = probe_gpu()
    if not probe.usable:
        print(f"no GPU benchmark: {probe.reason}")
        return 2
    args = [a for a in argv if not a.startswith("--") and not a.isdigit()]
    folder = Path(args[0]) if args else Path("gpu_check_bundle")
    n = int(argv[argv.index("--images") + 1]) if "--images" in argv else 1_000_000
    rows = []
    for entry in gpu_bundle.models(folder):
        m = n if entry["data"] == "mnist" else max(n // 20, 4096)    # 3x32x32 floats are 15x an MNIST image
        rows.append(bench(entry, m))
        r = rows[-1]
        print(f"  {r['model']}: batch {r['batch']}, {r['images']:,} items end to end", flush=True)
    print(f"{'model':<24} {'max|gpu-cpu|':>12} {'argmax':>7} {'batch':>7} {'device-resident img/s':>22} "
          f"{'end-to-end img/s':>17} {'input':>8}")
    for r in rows:
        print(f"{r['model']:<24} {r['max_abs_diff_vs_numpy']:>12.2e} {r['argmax_agreement']:>7.2%} {r['batch']:>7,} "
              f"{r['device_resident_images_per_s']:>22,.0f} {r['end_to_end_images_per_s']:>17,.0f} "
              f"{r['input_dtype']:>8}")
    print(f"{'model':<24} {'precision':>9} {'max|diff| vs fp32':>18} {'argmax':>7} {'device-resident img/s':>22} "
          f"{'vs fp32':>8}")
    for r in rows:
        for name, p in r["precisions"].items():
            print(f"{r['model']:<24} {name:>9} {p['max_abs_diff_vs_fp32']:>18.2e} {p['argmax_agreement']:>7.2%} "
                  f"{p['device_resident_images_per_s']:>22,.0f} "
                  f"{p['device_resident_images_per_s'] / r['device_resident_images_per_s']:>7.2f}x")
    print(f"{'model':<24} {'CUDA graph':>10} {'replays':>8} {'max|diff| vs eager':>19} {'device-resident img/s':>22} "
          f"{'vs eager':>9}")
    for r in rows:
        g = r["cuda_graphs"]
        print(f"{r['model']:<24} {'captured' if g['captured'] else 'eager':>10} {g['replays']:>8} "
              f"{g['max_abs_diff_vs_eager']:>19.2e} {g['device_resident_images_per_s']:>22,.0f} "
              f"{g['device_resident_images_per_s'] / r['device_resident_images_per_s']:>8.2f}x"
              + ("" if g["captured"] else f"  ({g['why_not']})"))
    print(f"(medians: device-resident of 5 x {REPS} back-to-back batches timed with CUDA events; "
          f"end to end of 3 passes; {rows[0]['gpu'] if rows else ''})")
    (folder / "gpu_bench.json").write_text(json.dumps(rows, indent=2))
    ok = all(r["max_abs_diff_vs_numpy"] < 1e-4 and r["cuda_graphs"]["max_abs_diff_vs_eager"] < 1e-4 for r in rows)
    return 0 if ok and rows else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
