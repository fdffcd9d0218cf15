"""The ``gpu-mdf`` command line. Each command parses, calls one library function, prints.

Every option is validated by click (types, ranges, choices) and shows its default in
``--help``; each command's help ends with an example. User errors
(:class:`GpuMdfError`) print one line and exit 2; Ctrl-C exits 130. TensorFlow's
start-up noise is kept out of the output unless ``--verbose`` is given.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from pathlib import Path

import click

from . import __version__
from .config import InferConfig
from .errors import GpuMdfError

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


class DeviceType(click.ParamType):
    """auto | cpu | gpu | gpu:N, with cuda and cuda:N as aliases of gpu."""

    name = "DEVICE"

    def convert(self, value, param, ctx):
        v = str(value).strip().lower()
        m = re.fullmatch(r"(auto|cpu|gpu|cuda)(?::(\d+))?", v)
        if not m or (m.group(1) in ("auto", "cpu") and m.group(2) is not None):
            self.fail(f"{value!r}: expected auto, cpu, gpu or gpu:N (cuda and cuda:N mean gpu)", param, ctx)
        return v.replace("cuda", "gpu")


DEVICE = click.option("--device", type=DeviceType(), default=None,
                      help="auto | cpu | gpu | gpu:N (cuda = gpu); default: the config's, else auto")
CONFIG = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                      help="YAML config (default: configs/mnist_dense.yaml)")
NORMALIZE = click.Choice(["l2", "scale", "none"])


def _errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GpuMdfError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as e:        # Ctrl-C: the whole command stops (a job says what it kept)
            click.echo(str(e) or "interrupted", err=True)
            sys.exit(130)
    return wrapper


def _log(msg: str):
    click.echo(msg, err=True)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="gpu-mdf")
@click.option("--verbose", is_flag=True, help="show TensorFlow's start-up messages and warnings")
def main(verbose):
    """Train Keras models on MNIST, convert them to ModECI MDF, run MDF graphs in bulk.

    \b
    Example:
      gpu-mdf run                     # train, convert, infer, report (runs/mnist_dense)
      gpu-mdf infer runs/mnist_dense/model.mdf.json --data my_digits/ --out runs/mine
    """
    from .engine.alloc import tune_host_allocator
    if verbose:
        os.environ["GPU_MDF_VERBOSE"] = "1"
    tune_host_allocator()  # this process is ours: keep big temporaries in the heap


@main.command()
@CONFIG
@click.option("--out", default=None, help="output folder (default: runs/<name>/train)")
@click.option("--epochs", type=click.IntRange(1), default=None, help="default: the config's")
@click.option("--seed", type=int, default=None, help="default: the config's")
@click.option("--train-limit", type=click.IntRange(1), default=None, help="train on the first N images only")
@click.option("--data", default=None, help="data source (default: the embedded MNIST)")
@_errors
def train(config_path, out, epochs, seed, train_limit, data):
    """Train the configured model; write .keras, .h5, summary, history, pictures.

    \b
    Example:
      gpu-mdf train --config configs/mnist_cnn.yaml --epochs 1 --out runs/cnn_quick
    """
    from .config import load_config, override
    from .train import train as do_train
    cfg = override(load_config(config_path), train__epochs=epochs, seed=seed,
                   data__train_limit=train_limit, data__source=data)
    res = do_train(cfg, Path(out or f"runs/{cfg.name}/train"), log=_log)
    score = f"test accuracy {res.test_accuracy:.4f} (loss" if res.test_accuracy is not None else "(test loss"
    click.echo(f"{score} {res.test_loss:.4f}) on {res.device}; model in {res.model_path}")


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--out", required=True, help="folder for the MDF files (<stem>.mdf.json)")
@click.option("--format", "fmt", type=click.Choice(["json", "yaml", "both", "bson"]), default="json",
              help="bson: modelspec's binary form, for big models (several times faster to write and read)")
@click.option("--normalize", type=NORMALIZE, default=None,
              help="how the model's integer pixels were normalised for training (l2: keras.utils.normalize axis 1, "
                   "scale: x/255, none: as they are); needed unless the model states it (a Rescaling/Normalization "
                   "first layer, or gpu-mdf's train_metrics.json beside it)")
@click.option("--outputs", default=None,
              help="ONNX: convert only these outputs (comma-separated names) and what they need, e.g. a "
                   "scikit-learn classifier's probabilities without its label lookup")
@_errors
def convert(models, out, fmt, normalize, outputs):
    """Convert Keras (.keras, .h5) and ONNX (.onnx: PyTorch, TensorFlow, scikit-learn...) models,
    files or folders of them, to MDF.

    \b
    Example:
      gpu-mdf convert model.onnx --normalize scale --out mdf/
      gpu-mdf convert runs/*/model.keras my_models/ --out mdf/ --format both
    """
    from .convert import convert_files
    results = convert_files(models, out, fmt, normalize, on_result=lambda r: click.echo(r.line()), log=_log,
                            outputs=[o.strip() for o in outputs.split(",") if o.strip()] if outputs else None)
    if not results:
        raise GpuMdfError(f"no .keras, .h5 or .onnx files in {', '.join(models)}")
    ok = sum(r.ok for r in results)
    click.echo(f"{ok} of {len(results)} model(s) converted into {out}")
    sys.exit(0 if ok == len(results) else 1)


@main.command()
@click.argument("mdf_file", type=click.Path(dir_okay=False))
@click.option("--out", default=None, help="folder for the PNGs (default: beside the file)")
@click.option("--level", "levels", multiple=True, type=click.IntRange(1, 3), default=(1, 3))
@_errors
def plot(mdf_file, out, levels):
    """Render an MDF graph (or an ONNX model's) with modeci_mdf's Graphviz exporter (levels 1 and 3).

    \b
    Example:
      gpu-mdf plot runs/mnist_dense/model.mdf.json --level 3 --out pictures/
    """
    from .convert.sources import resolve_model
    from .mdf import load_mdf
    from .viz import PictureSkipped, plot_mdf
    graph = resolve_model(mdf_file)        # an ONNX model: its MDF from the cache
    load_mdf(graph)  # clear error for a missing or broken file
    try:
        for p in plot_mdf(graph, out or Path(mdf_file).parent, levels):
            click.echo(str(p))
    except PictureSkipped as e:
        raise GpuMdfError(str(e)) from None


@main.command()
@click.argument("mdf_file", required=False, type=click.Path(dir_okay=False))
@click.option("--data", default=None,
              help="mnist[:test|:train], .npz, .npy ((N,28,28), (N,28,28,1) or (N,784)), Kaggle .csv, "
                   "IDX file/folder, or a folder of images (PNG, JPEG, BMP, TIFF; any size)  [default: mnist]")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", help="of an .npz or IDX folder")
@click.option("--labels", default=None, type=click.Path(dir_okay=False), help="labels .npy for a .npy input")
@click.option("--out", default=None,
              help="output folder  [default: runs/infer/<model>-<data>, a new one for another job]")
@DEVICE
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="items per chunk (default: the config's, else 2048 on the CPU and free memory on a GPU)")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default=None,
              help="skip: a bad item becomes an errors.csv row (default: the config's, else fail)")
@click.option("--normalize", type=NORMALIZE, default=None,
              help="override the pixel normalisation recorded in the MDF file; none feeds values as they are")
@click.option("--invert", type=click.Choice(["auto", "yes", "no"]), default="auto",
              help="image files: white-on-black digits (MNIST) or inverted; auto decides from the border")
@click.option("--top-k", type=click.IntRange(0), default=0, help="add the K best classes to predictions.csv")
@click.option("--output", "output_name", default=None,
              help="the output to score (default: the first with one score per class); every output is written")
@click.option("--softmax", type=click.Choice(["auto", "yes", "no"]), default="auto",
              help="auto: applied to an output that is not a distribution (logits), and said")
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=None,
              help="flag predictions whose probability is below this  [default: the config's, else "
                   f"{InferConfig.min_confidence:g}, chosen on the MNIST test set (README)]")
@click.option("--kaggle", is_flag=True, help="also write submission.csv (ImageId,Label) for Kaggle")
@click.option("--save-preprocessed", type=click.IntRange(0), default=0, metavar="N",
              help="save the first N images as the model got them (OUT/preprocessed/*.png)")
@click.option("--constants", type=click.Path(dir_okay=False), default=None,
              help=".npz of values for unconnected input ports (weights an exporter wrote as ports)")
@click.option("--opset", type=click.IntRange(1, 28), default=None,
              help="the ONNX opset of a file that does not record it (onnx_to_mdf's; default 17)")
@click.option("--cuda-graphs", is_flag=True,
              help="on a GPU, capture each batch shape as a CUDA graph and replay it (opt-in; refused without a GPU)")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "tf32"]), default=None,
              help="opt-in reduced precision (approximate: check it with `gpu-mdf bench --precision`); "
                   "fp16 runs every value in float16, tf32 rounds float32 products' inputs on an Ampere+ GPU")
@click.option("--overwrite", is_flag=True, help="replace another job's files in --out")
@click.option("--keep-chunks", is_flag=True, help="keep --out/.chunks after a successful job")
@click.option("--cluster", default=None,
              help="spread chunks over Dask: local[:N], cuda, or a scheduler address tcp://host:port")
@click.option("--cluster-timeout", type=click.FloatRange(0, min_open=True), default=None,
              help="seconds to reach a scheduler (default: the config's, else 10)")
@CONFIG
@click.option("--no-progress", is_flag=True)
@_errors
def infer(mdf_file, data, split, labels, out, device, batch_size, on_error, normalize, invert, top_k, output_name,
          softmax, min_confidence, kaggle, save_preprocessed, constants, opset, cuda_graphs, precision, overwrite,
          keep_chunks, cluster, cluster_timeout, config_path, no_progress):
    """Bulk inference of an MDF graph over a data source (resumable).

    MDF_FILE may be an ONNX model: it is converted once into a cache, and --normalize must
    say how its pixels were scaled (ONNX does not record it).

    With --config holding a ``jobs:`` list, runs every item in one process; each
    model is compiled once. Exit code 1 when any item failed.

    \b
    Example:
      gpu-mdf infer runs/mnist_dense/model.mdf.json --data scans/ --top-k 3 --on-error skip --out runs/scans
    """
    from .batch import cluster_session, run_inference, run_jobs
    from .config import load_config
    cfg = load_config(config_path) if config_path else None
    device = device or (cfg.infer.device if cfg else "auto")
    on_error = on_error or (cfg.infer.on_error if cfg else "fail")
    batch_size = batch_size or (cfg.infer.batch_size if cfg else None)
    cluster = cluster or (cfg.infer.cluster if cfg else None)
    timeout = cluster_timeout or (cfg.infer.cluster_timeout if cfg else 10.0)
    min_confidence = (cfg.infer if cfg else InferConfig()).min_confidence if min_confidence is None else min_confidence
    options = dict(invert=invert, top_k=top_k, overwrite=overwrite, keep_chunks=keep_chunks, normalize=normalize,
                   constants=constants, output=output_name, softmax=softmax, min_confidence=min_confidence,
                   kaggle=kaggle, save_preprocessed=save_preprocessed, opset=opset, cuda_graphs=cuda_graphs,
                   precision=precision)
    with cluster_session(cluster, _log, timeout) as session:   # one cluster for the whole command
        if cfg and cfg.jobs:
            ok = run_jobs(cfg.jobs, Path(out or f"runs/{cfg.name}/jobs"),
                          default_model=mdf_file, device=device, batch_size=batch_size, on_error=on_error,
                          log=_log, echo=click.echo, progress=not no_progress, cluster=session, **options)
            sys.exit(0 if ok else 1)
        if not mdf_file:
            raise GpuMdfError("give an MDF_FILE (or a --config with a jobs: list)")
        res = run_inference(mdf_file, out, source=data, split=split, labels=labels, device=device,
                            batch_size=batch_size, on_error=on_error, log=_log, progress=not no_progress,
                            cluster=session, **options)
    click.echo(res.summary())


@main.command()
@CONFIG
@click.option("--out", default=None, help="run folder (default: runs/<name>)")
@DEVICE
@click.option("--epochs", type=click.IntRange(1), default=None, help="default: the config's")
@click.option("--seed", type=int, default=None, help="default: the config's")
@click.option("--train-limit", type=click.IntRange(1), default=None, help="train on the first N images only")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="inference batch size")
@click.option("--format", "fmt", type=click.Choice(["json", "yaml", "both"]), default=None,
              help="MDF format (default: the config's, else json)")
@click.option("--no-progress", is_flag=True)
@_errors
def run(config_path, out, device, epochs, seed, train_limit, batch_size, fmt, no_progress):
    """The whole pipeline: train, save, convert, infer, compare with Keras, report.

    \b
    Example:
      gpu-mdf run --config configs/mnist_cnn.yaml --out runs/cnn
    """
    from .config import load_config, override
    from .pipeline import run_pipeline
    cfg = override(load_config(config_path), train__epochs=epochs, seed=seed,
                   data__train_limit=train_limit, infer__batch_size=batch_size, infer__format=fmt,
                   infer__device=device)
    summary = run_pipeline(cfg, Path(out or f"runs/{cfg.name}"), device=cfg.infer.device, log=_log,
                           progress=not no_progress)
    click.echo(summary.text())
    sys.exit(0 if summary.jobs_ok else 1)


@main.command()
@click.option("--model-repository", "repository", required=True, type=click.Path(file_okay=False),
              help="models as DIR/<model>/<version>/model.mdf.json or model.onnx (+ optional DIR/<model>/config.yaml)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (0.0.0.0 exposes the server to the network)")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="HTTP port (0: any free)")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=None,
              help="also serve the protocol's gRPC form on this port (0: any free; needs [grpc])")
@DEVICE
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="require 'Authorization: Bearer <token>' (the file's content) on every route but health")
@click.option("--max-body-mb", type=click.FloatRange(0.001), default=64, show_default=True,
              help="largest request body")
@click.option("--max-inflight-mb", type=click.FloatRange(1), default=1024, show_default=True,
              help="request bytes held at once, server-wide (bodies and what they expand into); past it, 503")
@click.option("--max-connections", type=click.IntRange(1), default=1024, show_default=True,
              help="open connections at once; past it, 503")
@click.option("--header-timeout", type=click.FloatRange(0.1), default=10, show_default=True,
              help="seconds a request's headers may take")
@click.option("--body-timeout", type=click.FloatRange(0.1), default=60, show_default=True,
              help="seconds a request's body may take after its headers")
@click.option("--keepalive-timeout", type=click.FloatRange(0.1), default=5, show_default=True,
              help="seconds an idle connection stays open")
@click.option("--retain-mb", type=click.FloatRange(0), default=64, show_default=True,
              help="freed host memory the server keeps for reuse after a burst")
@click.option("--blas-threads", type=click.IntRange(1), default=1, show_default=True,
              help="BLAS threads per batch (more helps large batches on many cores)")
@click.option("--convert-disk-mb", type=click.FloatRange(1), default=1024, show_default=True,
              help="what one conversion may write (its temp folder's quota and its largest file)")
@click.option("--no-access-log", is_flag=True, help="no JSON access-log line per request")
@_errors
def serve(repository, host, port, grpc_port, device, token_file, max_body_mb, max_inflight_mb, max_connections,
          header_timeout, body_timeout, keepalive_timeout, retain_mb, blas_threads, convert_disk_mb, no_access_log):
    """Serve MDF inference and model conversion over KServe v2 (REST with Triton's binary
    tensor data and model repository extensions; gRPC with --grpc-port), batching
    concurrent requests.

    \b
    Example:
      gpu-mdf serve --model-repository models/ --port 8000 --token-file token.txt
      curl -H "Authorization: Bearer $(cat token.txt)" localhost:8000/v2/models/mnist
    """
    from .serve import serve as run_server
    from .serve.http import Limits
    limits = Limits(max_body=int(max_body_mb * 2**20), inflight=int(max_inflight_mb * 2**20),
                    max_connections=max_connections, header_timeout=header_timeout, body_timeout=body_timeout,
                    keepalive_timeout=keepalive_timeout)
    run_server(repository, host=host, port=port, device=device or "auto", token_file=token_file, limits=limits,
               access_log=not no_access_log, grpc_port=grpc_port, retain_mb=retain_mb,
               convert_disk=int(convert_disk_mb * 2**20), blas_threads=blas_threads)


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--no-tensorflow", is_flag=True, help="skip TensorFlow's view (faster)")
@click.option("--opset", type=click.IntRange(1, 28), default=None,
              help="the ONNX opset of an MDF file that does not record it (default 17)")
@_errors
def info(model, as_json, no_tensorflow, opset):
    """Versions, visible GPUs, and why the GPU is or is not used; with MODEL (MDF or .onnx),
    what it takes and gives: inputs, outputs, opset, normalisation, ops.

    \b
    Example:
      gpu-mdf info --json
      gpu-mdf info model.onnx
    """
    from .info import collect, describe_model, render, render_model
    if model:
        data = describe_model(model, opset=opset)
        click.echo(json.dumps(data, indent=2) if as_json else render_model(data))
        return
    data = collect(with_tensorflow=not no_tensorflow)
    click.echo(json.dumps(data, indent=2) if as_json else render(data))


@main.command()
@click.argument("mdf_file", required=False, type=click.Path(dir_okay=False))
@click.option("--keras-model", default=None, type=click.Path(dir_okay=False),
              help=".keras file for the TensorFlow baselines")
@click.option("--onnx-model", default=None, type=click.Path(dir_okay=False),
              help="the original ONNX file for the ONNX Runtime row (default: MDF_FILE when it is ONNX, else "
                   "tf2onnx's export of --keras-model, else the MDF graph exported to ONNX)")
@click.option("--constants", default=None, type=click.Path(dir_okay=False),
              help=".npz of values for unconnected input ports (weights written as ports)")
@click.option("--batch", type=click.IntRange(1), default=None,
              help="items per run (default: the 10,000 MNIST test images, or 64 random items)")
@click.option("--repeats", type=click.IntRange(1), default=20, help="timed runs per engine (the median is shown)")
@click.option("--stream", type=click.IntRange(0), default=0, help="also stream N images from a .npy file")
@click.option("--skip", multiple=True, type=click.Choice(["onnxruntime", "tensorflow", "evaluablegraph"]),
              help="baselines to skip")
@click.option("--cluster-scaling", type=click.IntRange(0), default=0,
              help="also run an N-image job as one process, on local:1 and on local:2 (Dask)")
@click.option("--standin", is_flag=True,
              help="also count kernel launches and new device memory per batch on the strict CuPy stand-in")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp16", "tf32"]),
              help="also time an opt-in reduced precision (fp16: CPU and GPU; tf32: GPU) and report its "
                   "agreement with float32 (max |difference|, top-1 agreement)")
@click.option("--cuda-graphs", is_flag=True,
              help="also time the program replayed as a CUDA graph on the GPU (opt-in)")
@click.option("--json-out", default=None, type=click.Path(dir_okay=False), help="write the table as JSON here")
@_errors
def bench(mdf_file, keras_model, onnx_model, constants, batch, repeats, stream, skip, cluster_scaling, standin,
          precisions, cuda_graphs, json_out):
    """Benchmark gpu-mdf against ONNX Runtime, TensorFlow and EvaluableGraph (ratios).

    MDF_FILE is an MDF file or an ONNX model (converted through the cache; ONNX Runtime
    then runs the file itself).

    Time NumPy with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset where a machine sets them.

    \b
    Example:
      gpu-mdf bench runs/mnist_dense/model.mdf.json --keras-model runs/mnist_dense/model.keras
    """
    from .bench import main as bench_main
    bench_main(mdf_file, keras_model, repeats, stream, set(skip), json_out, echo=click.echo,
               cluster_scaling_n=cluster_scaling, onnx_model=onnx_model, constants=constants, batch=batch,
               standin=standin, precisions=precisions, cuda_graphs=cuda_graphs)


if __name__ == "__main__":
    main()
