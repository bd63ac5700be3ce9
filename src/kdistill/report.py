"""The run report: a Markdown page, an HTML page with embedded plots, and the plot files."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from kdistill import artifacts
from kdistill.config import Config

MODELS = ("teacher", "baseline", "student")


def _cell(summary: dict[str, Any], key: str, percent: bool = False) -> str:
    if key not in summary:
        return "-"
    scale, unit = (100.0, "%") if percent else (1.0, "")
    text = f"{scale * summary[key]:.2f}{unit}" if percent else f"{summary[key]:.4f}"
    if f"{key}_std" in summary and len(summary.get("per_seed", [])) > 1:
        std = scale * summary[f"{key}_std"]
        text += f" ± {std:.2f}" if percent else f" ± {std:.4f}"
    return text


def comparison_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """Rows of the side-by-side table: model, accuracy, NLL, ECE, agreement, params."""
    rows = []
    for name in MODELS:
        summary = metrics["models"][name]
        rows.append([
            name,
            _cell(summary, "accuracy", percent=True),
            _cell(summary, "nll"),
            _cell(summary, "ece"),
            _cell(summary, "teacher_agreement", percent=True) if name != "teacher" else "-",
            f"{summary['params']:,}",
        ])  # fmt: skip
    return rows


HEADER = ["model", "test accuracy", "NLL", "ECE", "teacher agreement", "params"]


def text_table(metrics: dict[str, Any]) -> str:
    """Render the comparison as aligned plain text for the terminal."""
    rows = [HEADER, *comparison_rows(metrics)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(metrics: dict[str, Any]) -> str:
    rows = [HEADER, ["---"] * len(HEADER), *comparison_rows(metrics)]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _per_seed_table(metrics: dict[str, Any]) -> str:
    baseline = metrics["models"]["baseline"]["per_seed"]
    student = metrics["models"]["student"]["per_seed"]
    lines = ["| seed | baseline | student | difference |", "| --- | --- | --- | --- |"]
    for b, s in zip(baseline, student, strict=True):
        lines.append(
            f"| {b['seed']} | {100 * b['accuracy']:.2f}% | {100 * s['accuracy']:.2f}% "
            f"| {100 * (s['accuracy'] - b['accuracy']):+.2f} |"
        )
    return "\n".join(lines)


def _plots(folder: Path, histories: list[dict[str, Any]]) -> list[Path]:
    """Draw validation accuracy and training loss per epoch; return the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    colors = {"teacher": "black", "baseline": "tab:blue", "student": "tab:orange"}
    for key, label in (("val_accuracy", "validation accuracy"), ("loss", "training loss")):
        figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        seen = set()
        for model in MODELS:
            for seed in sorted({r["seed"] for r in histories if r["model"] == model}):
                records = [r for r in histories if r["model"] == model and r["seed"] == seed]
                axis.plot(
                    [r["epoch"] for r in records],
                    [r[key] for r in records],
                    color=colors[model],
                    alpha=0.8,
                    linewidth=1.2,
                    label=None if model in seen else model,
                )
                seen.add(model)
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        path = folder / "plots" / f"{key}.png"
        artifacts.atomic_write(path, lambda tmp, f=figure: f.savefig(tmp, format="png"))
        plt.close(figure)
        paths.append(path)
    return paths


def _summary_lines(metrics: dict[str, Any], config: Config) -> list[str]:
    """Describe the data, the distillation settings and the seeds in two sentences."""
    data = metrics["data"]
    return [
        f"Data: {data['source']} ({data['train']} train, {data['val']} validation, "
        f"{data['test']} test examples, {data['features']} features, {data['classes']} classes).",
        f"Distillation: T = {config.distill.temperature:g}, alpha = {config.distill.alpha:g}, "
        f"soft targets computed in {'bfloat16' if config.teacher_bf16 else 'float32'}; "
        f"{len(metrics['seeds'])} paired seeds. Numbers are on the test split, mean ± std "
        "over seeds.",
    ]


def markdown_report(metrics: dict[str, Any], config: Config) -> str:
    comparison = metrics["comparison"]
    return "\n".join([
        "# kdistill run report",
        "",
        *_summary_lines(metrics, config),
        "",
        markdown_table(metrics),
        "",
        f"**Verdict:** {comparison['verdict']}.",
        f"{comparison['nll']['verdict']}.",
        f"Interval method: {comparison['method']}.",
        "",
        "## Per seed (test accuracy)",
        "",
        _per_seed_table(metrics),
        "",
        f"Exported student: seed {metrics['exported_seed']}, chosen on validation accuracy.",
        "",
        "## Curves",
        "",
        "![validation accuracy](plots/val_accuracy.png)",
        "![training loss](plots/loss.png)",
        "",
    ])  # fmt: skip


def _html_table(markdown: str) -> str:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if "---" not in line]
    head, body = rows[0], rows[1:]
    out = [
        "<table>",
        "<tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>",
    ]
    for row in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def html_report(metrics: dict[str, Any], plots: list[Path], config: Config) -> str:
    images = "".join(
        f'<img alt="{p.stem}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}">'
        for p in plots
    )
    comparison = metrics["comparison"]
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>kdistill report</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        "img{max-width:48%}</style></head><body>"
        "<h1>kdistill run report</h1>"
        f"<p>{'<br>'.join(html.escape(line) for line in _summary_lines(metrics, config))}</p>"
        f"{_html_table(markdown_table(metrics))}"
        f"<p><b>Verdict:</b> {html.escape(comparison['verdict'])}.<br>"
        f"{html.escape(comparison['nll']['verdict'])}.<br>"
        f"Interval method: {html.escape(comparison['method'])}.</p>"
        f"<h2>Per seed (test accuracy)</h2>{_html_table(_per_seed_table(metrics))}"
        f"<p>Exported student: seed {metrics['exported_seed']}, chosen on validation "
        "accuracy.</p>"
        f"<h2>Curves</h2>{images}</body></html>\n"
    )


def write_report(
    folder: Path, metrics: dict[str, Any], histories: list[dict[str, Any]], config: Config
) -> None:
    """Write report.md, report.html and plots/ into the run folder."""
    plots = _plots(folder, histories)
    artifacts.write_text(folder / "report.md", markdown_report(metrics, config))
    artifacts.write_text(folder / "report.html", html_report(metrics, plots, config))
