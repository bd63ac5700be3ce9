"""Saving and loading models as safetensors weights plus a ``model.json`` description.

Nothing here unpickles: weights come from safetensors and the architecture from JSON, so a
file from an untrusted source cannot run code when it is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kdistill import __version__
from kdistill.artifacts import atomic_write, read_json, write_json
from kdistill.models import Classifier, build_model

MODEL_FORMAT = "kdistill-model"
WEIGHT_NAMES = ("model.safetensors", "student.safetensors")


class CheckpointError(ValueError):
    """A model file that cannot be loaded, with the path and the reason."""


def clean_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return contiguous CPU tensors under plain names (no ``module.`` or ``_orig_mod.``)."""
    state = {}
    for key, value in model.state_dict().items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value.detach().to("cpu").contiguous()
    return state


def describe_model(model: Classifier, class_names: list[str], config: dict | None) -> dict:
    """Build the JSON description that ``load`` needs to rebuild ``model``."""
    spec = model.spec
    return {
        "format": MODEL_FORMAT,
        "format_version": 1,
        "spec": spec,
        "num_classes": spec["num_classes"],
        "class_names": list(class_names),
        "input_shape": [spec["in_features"]],
        "input_dtype": "float32",
        "normalization": {
            "kind": "standardize",
            "mean": model.standardize.mean.tolist(),
            "std": model.standardize.std.tolist(),
        },
        "kdistill_version": __version__,
        "torch_version": torch.__version__,
        "config": config,
    }


def save_model(
    folder: str | Path,
    model: Classifier,
    class_names: list[str],
    config: dict | None = None,
    weights_name: str = "model.safetensors",
) -> list[Path]:
    """Write ``weights_name`` and ``model.json`` into ``folder``; return both paths."""
    folder = Path(folder)
    state = clean_state_dict(model)
    weights = atomic_write(folder / weights_name, lambda tmp: save_file(state, str(tmp)))
    description = write_json(folder / "model.json", describe_model(model, class_names, config))
    return [weights, description]


def _locate(path: Path) -> tuple[Path, Path]:
    """Return (weights, model.json) for a folder or a .safetensors file."""
    if not path.exists():
        raise CheckpointError(f"{path}: not found; pass a model folder or its .safetensors file")
    if path.is_dir():
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name, path / "model.json"
        raise CheckpointError(f"{path}: no {' or '.join(WEIGHT_NAMES)} in this folder")
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path}: only .safetensors weights are loaded (pickle-based .pt/.pth/.bin files "
            "can run code when opened); pass a model folder or its .safetensors file"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    return path, path.parent / "model.json"


def read_description(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; it describes the architecture next to the weights")
    try:
        description = read_json(path)
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(description, dict) or description.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: not a kdistill model description")
    version = description.get("format_version")
    if version != 1:
        raise CheckpointError(
            f"{path}: format_version {version!r} is not supported (this kdistill reads 1); "
            "upgrade kdistill or re-export the model"
        )
    return description


def load_weights(model: torch.nn.Module, weights: Path) -> None:
    """Load safetensors weights strictly; a missing or unexpected key is an error naming it."""
    try:
        state = load_file(str(weights))
    except Exception as error:  # safetensors raises several types for a corrupt header
        raise CheckpointError(f"{weights}: cannot read safetensors ({error})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: weights do not match the architecture in model.json; "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{weights}: {key} has shape {tuple(tensor.shape)}, "
                f"the architecture expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=True)


def load(path: str | Path) -> Classifier:
    """Rebuild a saved model that takes raw (unstandardized) inputs, in eval mode.

    ``path`` is a model folder (``model.safetensors`` or ``student.safetensors`` beside
    ``model.json``) or the ``.safetensors`` file itself.
    """
    weights, description_path = _locate(Path(path))
    description = read_description(description_path)
    model = build_model(description["spec"])
    load_weights(model, weights)
    model.class_names = list(description.get("class_names", []))
    return model.eval()
