"""The run report: ``report.md`` and a self-contained ``report.html`` in the run folder.

Both are rendered from one list of sections, so the page holds everything the
Markdown does: the summary table, the pictures (with alt text: training curves,
graphs, the confusion matrix, a gallery of misclassified digits) and the notes on
pictures that were skipped, the Keras summary, the per-class table, and links to
the run's files.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from .io import write_text


@dataclass
class Section:
    title: str
    table: list[list[str]] | None = None        # first row: the header
    picture: Path | None = None
    alt: str = ""
    pre: str | None = None
    items: list[str] = field(default_factory=list)
    text: str | None = None
    links: list[tuple[str, str]] = field(default_factory=list)   # (href relative to the report, what it is)


def _md(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for s in sections:
        if s.title:
            out += [f"## {s.title}", ""]
        if s.table:
            out += ["| " + " | ".join(s.table[0]) + " |", "|" + "---|" * len(s.table[0])]
            out += ["| " + " | ".join(r) + " |" for r in s.table[1:]]
            out.append("")
        if s.picture is not None:
            out += [f"![{s.alt}]({s.picture.name})", ""]
        if s.pre is not None:
            out += ["```", s.pre.rstrip(), "```", ""]
        if s.items:
            out += [f"- {i}" for i in s.items] + [""]
        if s.links:
            out += [f"- [{href}]({quote(href)}): {what}" for href, what in s.links] + [""]
        if s.text:
            out += [s.text, ""]
    return "\n".join(out)


def _html(title: str, sections: list[Section]) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>"]
    for s in sections:
        if s.title:
            body.append(f"<h2>{e(s.title)}</h2>")
        if s.table:
            head = "".join(f"<th>{e(c)}</th>" for c in s.table[0])
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in s.table[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        if s.picture is not None:
            data = base64.b64encode(s.picture.read_bytes()).decode()
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(s.alt)}">'
                        f"<figcaption>{e(s.alt)}</figcaption></figure>")
        if s.pre is not None:
            body.append(f"<pre>{e(s.pre)}</pre>")
        if s.items:
            body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in s.items) + "</ul>")
        if s.links:
            body.append("<ul>" + "".join(f'<li><a href="{e(quote(href))}">{e(href)}</a>: {e(what)}</li>'
                                         for href, what in s.links) + "</ul>")
        if s.text:
            body.append(f"<p>{e(s.text)}</p>")
    return ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{e(title)}</title><style>"
            "body{font-family:sans-serif;max-width:960px;margin:auto;padding:0 1em}"
            "table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left;border-bottom:1px solid #ddd}"
            "img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:90%}"
            "</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(out: Path, cfg, tr, res, summary, mdf_paths, mdf_pictures) -> Path:
    out = Path(out)
    m = res.metrics
    rows = [[k, v] for k, v in summary.rows() if k not in ("MDF throughput", "total time", "run folder")] + [
        ["MDF throughput", f"{summary.images_per_s:,.0f} images/s"],
        ["inference device", f"{res.device} ({m['device_reason']})"],
        ["training device", tr.device],
        ["training time", f"{tr.seconds:.1f} s"],
        ["total run time", f"{summary.seconds:.1f} s"],
        ["MDF file", ", ".join(f"{p.name} ({p.stat().st_size / 1e6:.2f} MB)" for p in mdf_paths)],
    ]
    sections = [Section("", table=[["metric", "value"]] + rows)]
    if tr.skipped:
        sections.append(Section("Skipped pictures", items=[f"{name}: {why}" for name, why in tr.skipped]))
    summary_txt = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    sections.append(Section("Keras model", pre=summary_txt))
    pictures = [("Keras model", out / "model_plot.png", f"Keras layer graph of {cfg.name}"),
                ("Training curves", out / "training_curves.png", "Loss and accuracy per epoch (history.json)"),
                *[(f"MDF graph (level {p.stem[-1]})", p, f"MDF graph of {cfg.name}, detail level {p.stem[-1]}")
                  for p in mdf_pictures],
                ("First test digit", out / "digit.png", "The first test image with its predicted class"),
                ("Reconstructions", out / "reconstructions.png",
                 "The first test images (top) and the MDF graph's reconstructions of them (bottom)"),
                ("Confusion matrix", out / "confusion_matrix.png",
                 "Confusion matrix of the MDF predictions on the test set"),
                ("Misclassified digits", out / "misclassified.png",
                 "Misclassified test images, each with its true and predicted class and the prediction's probability")]
    for title, p, alt in pictures:
        if p.exists():
            sections.append(Section(title, picture=p, alt=alt))
    per_class = m.get("per_class", {})
    if per_class:
        table = [["class", "precision", "recall", "support"]]
        table += [[k, "-" if v["precision"] is None else f"{v['precision']:.4f}",
                   "-" if v["recall"] is None else f"{v['recall']:.4f}", str(v["support"])]
                  for k, v in per_class.items()]
        sections.append(Section("Per class", table=table))
    sections.append(Section("Files", links=_file_links(out, res, mdf_paths)))
    title = f"gpu-mdf run: {cfg.name}"
    write_text(out / "report.md", _md(title, sections))
    write_text(out / "report.html", _html(title, sections))
    return out / "report.md"


_RUN_FILES = {"model.keras": "the trained Keras model", "model.h5": "the same, HDF5",
              "summary.txt": "Keras's model summary", "history.json": "loss and metrics per epoch",
              "train_metrics.json": "training: test score, device, time, config", "summary.json": "this run's summary"}
_INFERENCE_FILES = {"predictions": "one row per test image: predicted and true class, probability",
                    "probabilities": "class probabilities (N, classes)", "metrics": "accuracy, confusion matrix, "
                    "per-class scores, provenance", "errors": "items that could not be run",
                    "submission": "Kaggle's ImageId,Label"}


def _file_links(out: Path, res, mdf_paths) -> list[tuple[str, str]]:
    """(path relative to the run folder, what it holds) for every file of the run that exists."""
    links = [(name, what) for name, what in _RUN_FILES.items() if (out / name).exists()]
    links += [(p.name, "the MDF graph") for p in mdf_paths]
    for key, path in getattr(res, "files", {}).items():
        p = Path(path)
        if not p.is_file() or out.resolve() not in p.resolve().parents:
            continue
        what = f"output {key.split(':', 1)[1]} of the graph, as it came" if key.startswith("output:") \
            else _INFERENCE_FILES.get(key, key)
        links.append((str(p.resolve().relative_to(out.resolve())), what))
    return links
