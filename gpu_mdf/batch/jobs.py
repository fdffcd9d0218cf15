"""Multi-item jobs: several models and data sources in one process.

Each MDF file is compiled once (cached) and reused for every item that names it;
one failing item is reported and does not stop the rest; Ctrl-C stops them all (it is
no item's failure).
"""

from __future__ import annotations

from pathlib import Path

from ..convert.sources import resolve_model
from ..engine import compile, load_constants
from ..errors import GpuMdfError
from ..io import safe_join
from .distributed import cluster_session
from .infer import run_inference


def run_jobs(items, out_dir: Path, default_model=None, device="auto", batch_size=None,
             on_error="fail", log=print, echo=print, progress=True, cluster=None, **infer_options) -> bool:
    """Run every item; ``cluster`` (a spec or an open session) serves all of them. Each
    item writes into ``out_dir/<name>``, which must stay inside ``out_dir``.
    ``infer_options`` go to every item's :func:`~gpu_mdf.batch.infer.run_inference`."""
    programs = {}
    ok_all = True
    with cluster_session(cluster, log) as session:
        for i, item in enumerate(items):
            model = item.model or default_model
            name = item.name or f"item{i}"
            try:
                if not model:
                    raise GpuMdfError("no model: give one in the item or as MDF_FILE")
                folder = safe_join(out_dir, name, "job item name")     # refused before anything runs
                model = resolve_model(model, infer_options.get("normalize"), log=log, need_normalize=True)
                key = str(Path(model).resolve())
                if key not in programs:
                    consts = infer_options.get("constants")
                    programs[key] = compile(model, device="cpu" if session else device,
                                            normalize=infer_options.get("normalize"), opset=infer_options.get("opset"),
                                            constants=load_constants(consts) if consts else None,
                                            cuda_graphs=bool(infer_options.get("cuda_graphs")) and not session,
                                            precision=None if session and infer_options.get("precision") == "tf32"
                                            else infer_options.get("precision"))
                res = run_inference(model, folder, source=item.data, device=device,
                                    batch_size=batch_size, on_error=on_error, program=programs[key],
                                    log=log, progress=progress, cluster=session, **infer_options)
                acc = f", accuracy {res.accuracy:.4f}" if res.accuracy is not None else ""
                echo(f"ok   {name}: {res.n} images{acc}, {res.images_per_s:,.0f} images/s")
            except GpuMdfError as e:
                ok_all = False
                echo(f"FAIL {name}: {e}")
    echo(f"{len(programs)} model(s) compiled for {len(items)} item(s); "
         f"{'all succeeded' if ok_all else 'some failed'}")
    return ok_all
