#!/usr/bin/env python
"""GPU benchmark for the prepared check (needs NumPy and CuPy only).

    python scripts/gpu_bench.py BUNDLE_DIR [--images 1000000]

Prints one table: CuPy vs NumPy agreement on the 10k test images, device-resident
throughput, and end-to-end throughput from host uint8 arrays, for each MDF file.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from gpu_mdf.data import load_mnist
from gpu_mdf.engine import compile


def timed(fn, sync, repeats=5):
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(path: Path, n: int, device="gpu") -> dict:
    """One model: agreement with NumPy, device-resident and end-to-end images/s.
    ``device`` may be a Backend (the tests pass a CuPy stand-in)."""
    cpu = compile(path, device="cpu")
    gpu = compile(path, device=device)
    (_, _), (xte, _) = load_mnist()
    shape = tuple(gpu.inputs[0].shape[1:])
    x10k = xte.reshape((len(xte),) + shape)
    diff = float(np.abs(gpu.run(x10k) - cpu.run(x10k)).max())
    agree = float((gpu.run(x10k).argmax(1) == cpu.run(x10k).argmax(1)).mean())
    host = np.resize(x10k, (n,) + shape)           # n images tiled from the test set, uint8
    sync = gpu.backend.synchronize
    # device-resident: normalised input already on the GPU, one program execution
    bs = gpu.suggest_batch_size(n)
    dev = gpu.prepare(host[:bs])
    feeds = {gpu.inputs[0].name: dev}
    t_dev = timed(lambda: gpu.execute(feeds), sync) * (n / bs)
    # end to end: host uint8 chunks -> pinned -> device (overlapped) -> normalise -> run -> host
    chunk = min(bs, 1 << 17)
    chunks = [host[i:i + chunk] for i in range(0, n, chunk)]
    t_e2e = timed(lambda: [None for _ in gpu.run_many(iter(chunks))], sync, repeats=3)
    return {"model": path.name, "images": n, "max_abs_diff_vs_numpy": diff, "argmax_agreement": agree,
            "device_resident_images_per_s": n / t_dev, "end_to_end_images_per_s": n / t_e2e,
            "batch": bs, "chunk": chunk, "gpu": gpu.backend.reason}


def main(argv):
    from gpu_mdf.backend import probe_gpu
    probe = probe_gpu()
    if not probe.usable:
        print(f"no GPU benchmark: {probe.reason}")
        return 2
    folder = Path(argv[0]) if argv else Path("gpu_check_bundle")
    n = int(argv[argv.index("--images") + 1]) if "--images" in argv else 1_000_000
    rows = [bench(p, n) for p in sorted(folder.glob("*.mdf.json"))]
    print(f"{'model':<20} {'max|gpu-cpu|':>12} {'argmax agree':>12} {'device-resident img/s':>22} "
          f"{'end-to-end img/s':>17}")
    for r in rows:
        print(f"{r['model']:<20} {r['max_abs_diff_vs_numpy']:>12.2e} {r['argmax_agreement']:>12.2%} "
              f"{r['device_resident_images_per_s']:>22,.0f} {r['end_to_end_images_per_s']:>17,.0f}")
    print(f"({n:,} images tiled from the MNIST test set; {rows[0]['gpu'] if rows else ''})")
    (folder / "gpu_bench.json").write_text(json.dumps(rows, indent=2))
    ok = all(r["max_abs_diff_vs_numpy"] < 1e-5 for r in rows)
    return 0 if ok and rows else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
