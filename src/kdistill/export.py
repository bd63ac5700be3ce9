"""Export of the distilled student (safetensors and model.json for now)."""

from __future__ import annotations

from pathlib import Path

import torch

from kdistill import artifacts, checkpoint
from kdistill.models import Classifier


def export_student(
    model: Classifier,
    folder: Path,
    formats: list[str],
    class_names: list[str],
    x_check: torch.Tensor,
    config: dict | None = None,
) -> dict:
    """Write the student into ``folder`` in the requested formats; return the manifest."""
    folder = Path(folder)
    written = checkpoint.save_model(folder, model, class_names, config, "student.safetensors")
    files = {
        p.name: {"sha256": artifacts.sha256_file(p), "bytes": p.stat().st_size} for p in written
    }
    manifest = {"files": files}
    artifacts.write_json(folder / "manifest.json", manifest)
    return manifest
