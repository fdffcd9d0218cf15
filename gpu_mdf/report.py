"""The run report: ``report.md`` and a self-contained ``report.html`` in the run folder."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from .io import write_text


def _table(rows) -> list[str]:
    out = ["| metric | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    return out


def write_report(out: Path, cfg, tr, res, summary, mdf_paths, mdf_pictures) -> Path:
    out = Path(out)
    m = res.metrics
    rows = [
        ("Keras test accuracy", f"{summary.keras_accuracy:.4f}"),
        ("MDF test accuracy", f"{summary.mdf_accuracy:.4f}"),
        ("max abs difference MDF vs Keras", f"{summary.max_abs_diff:.3g}"),
        ("argmax agreement", f"{summary.argmax_agreement:.2%}"),
        ("MDF throughput", f"{summary.images_per_s:,.0f} images/s"),
        ("inference device", f"{res.device} ({m['device_reason']})"),
        ("training device", tr.device),
        ("training time", f"{tr.seconds:.1f} s"),
        ("total run time", f"{summary.seconds:.1f} s"),
        ("MDF file", ", ".join(f"{p.name} ({p.stat().st_size / 1e6:.2f} MB)" for p in mdf_paths)),
    ]
    pictures = [("Keras model", out / "model_plot.png"),
                *[(f"MDF graph (level {p.stem[-1]})", p) for p in mdf_pictures],
                ("First test digit", out / "digit.png"),
                ("Confusion matrix", out / "confusion_matrix.png")]
    pictures = [(t, p) for t, p in pictures if p.exists()]
    summary_txt = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    per_class = m.get("per_class", {})

    md = [f"# gpu-mdf run: {cfg.name}", "", *_table(rows), ""]
    if tr.skipped:
        md += ["Skipped pictures:", *[f"- {name}: {why}" for name, why in tr.skipped], ""]
    md += ["## Keras model", "", "```", summary_txt.rstrip(), "```", ""]
    for title, p in pictures:
        md += [f"## {title}", "", f"![{title}]({p.name})", ""]
    if per_class:
        md += ["## Per class", "", "| class | precision | recall | support |", "|---|---|---|---|"]
        md += [f"| {k} | {v['precision']:.4f} | {v['recall']:.4f} | {v['support']} |"
               for k, v in per_class.items() if v["precision"] is not None]
        md.append("")
    md += [f"Files: `inference/` (predictions.csv, probabilities.npy, metrics.json), "
           f"`model.keras`, `model.h5`, {', '.join(f'`{p.name}`' for p in mdf_paths)}.", ""]
    write_text(out / "report.md", "\n".join(md))

    def img(p: Path) -> str:
        data = base64.b64encode(p.read_bytes()).decode()
        return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'

    body = [f"<h1>gpu-mdf run: {html.escape(cfg.name)}</h1>", "<table>"]
    body += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows]
    body += ["</table>", "<h2>Keras model</h2>", f"<pre>{html.escape(summary_txt)}</pre>"]
    for title, p in pictures:
        body += [f"<h2>{html.escape(title)}</h2>", img(p)]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>gpu-mdf report</title>"
            "<style>body{font-family:sans-serif;max-width:960px;margin:auto}"
            "td,th{padding:2px 8px;text-align:left}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
    write_text(out / "report.html", page)
    return out / "report.md"
