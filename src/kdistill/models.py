"""Model definitions built from config: a standardizing input layer followed by an MLP."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdistill.config import ModelConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class Standardize(nn.Module):
    """Feature standardization fitted on the training split, stored as buffers.

    Keeping it inside the model means saved and exported models take raw inputs.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Raw features (batch, features) -> class logits (batch, classes)."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.spec = spec
        features = spec["in_features"]
        self.standardize = Standardize(torch.zeros(features), torch.ones(features))
        layers: list[nn.Module] = []
        if spec["input_dropout"] > 0:
            layers.append(nn.Dropout(spec["input_dropout"]))
        width = features
        for hidden in spec["hidden"]:
            layers.append(nn.Linear(width, hidden))
            if spec["batch_norm"]:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(_ACTIVATIONS[spec["activation"]]())
            if spec["dropout"] > 0:
                layers.append(nn.Dropout(spec["dropout"]))
            width = hidden
        layers.append(nn.Linear(width, spec["num_classes"]))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardize(x))


def model_spec(
    config: ModelConfig,
    in_features: int,
    num_classes: int,
    feature_names: list[str] | None = None,
) -> dict[str, Any]:
    """Describe an architecture as plain JSON-ready values, enough to rebuild it.

    ``feature_names`` (CSV column names) let predict match input columns by name.
    """
    spec = {
        "arch": "mlp",
        "in_features": int(in_features),
        "num_classes": int(num_classes),
        "hidden": [int(h) for h in config.hidden],
        "activation": config.activation,
        "dropout": float(config.dropout),
        "input_dropout": float(config.input_dropout),
        "batch_norm": bool(config.batch_norm),
    }
    if feature_names is not None:
        spec["feature_names"] = list(feature_names)
    return spec


def build_model(
    spec: dict[str, Any], mean: torch.Tensor | None = None, std: torch.Tensor | None = None
) -> Classifier:
    """Build a classifier from a spec; initial weights come from torch's current RNG state."""
    model = Classifier(spec)
    if mean is not None and std is not None:
        model.standardize.mean.copy_(mean)
        model.standardize.std.copy_(std)
    return model


def count_params(model: nn.Module) -> int:
    """Count trainable parameters (buffers such as the standardization are not counted)."""
    return sum(p.numel() for p in model.parameters())
