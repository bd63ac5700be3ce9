"""Aggregating per-seed results into ``metrics.json`` and the manifest of a run."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch

from kdistill import __version__, artifacts
from kdistill.metrics import mean_std, nll_line, paired_interval, verdict

SUMMARY_KEYS = ("accuracy", "nll", "ece", "teacher_agreement", "val_accuracy")


def summarize_model(per_seed: list[dict[str, Any]], params: int) -> dict[str, Any]:
    """Mean and sample std over seeds of every metric, plus the per-seed values."""
    summary: dict[str, Any] = {}
    for key in SUMMARY_KEYS:
        values = [row[key] for row in per_seed if row.get(key) is not None]
        if values:
            summary[key], summary[f"{key}_std"] = mean_std(values)
            if len(values) < 2:
                summary[f"{key}_std"] = None  # a sample std needs two seeds
    summary["params"] = params
    summary["per_seed"] = per_seed
    return summary


def choose_export_seed(students: list[dict[str, Any]]) -> int:
    """Pick the distilled student with the best validation accuracy; ties go to the first.

    Choosing on validation keeps the test split out of model selection.
    """
    best = max(range(len(students)), key=lambda i: (students[i]["val_accuracy"], -i))
    return students[best]["seed"]


def build_metrics(
    teacher: dict[str, Any],
    baseline: list[dict[str, Any]],
    student: list[dict[str, Any]],
    params: dict[str, int],
    confidence: float,
    context: dict[str, Any],
) -> dict[str, Any]:
    """Assemble ``metrics.json``: every model on the test split and the paired verdict."""
    interval = paired_interval(
        [row["accuracy"] for row in student], [row["accuracy"] for row in baseline], confidence
    )
    nll_interval = paired_interval(
        [row["nll"] for row in student], [row["nll"] for row in baseline], confidence
    )
    return {
        "split": "test",
        "models": {
            "teacher": {**teacher, "params": params["teacher"]},
            "baseline": summarize_model(baseline, params["student"]),
            "student": summarize_model(student, params["student"]),
        },
        "comparison": {
            "metric": "accuracy",
            "treatment": "student",
            "control": "baseline",
            **interval.to_dict(),
            "verdict": verdict(interval),
            "nll": {**nll_interval.to_dict(), "verdict": nll_line(nll_interval)},
        },
        "exported_seed": choose_export_seed(student),
        **context,
    }


def versions() -> dict[str, str]:
    return {
        "kdistill": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_manifest(folder: Path, seed: int, data: dict[str, Any]) -> Path:
    """Write ``manifest.json`` with versions, seed, data fingerprint and every file's sha256.

    It is written last, so its presence marks a complete run.
    """
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative in ("manifest.json", "log.jsonl") or path.name.startswith("."):
            continue
        files[relative] = {"sha256": artifacts.sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"versions": versions(), "seed": seed, "data": data, "files": files}
    return artifacts.write_json(folder / "manifest.json", manifest)
