"""Teachers: freezing a trained model and computing its logits once for reuse."""

from __future__ import annotations

import torch
from torch import nn

from kdistill.trainer import predict_logits


def freeze(model: nn.Module) -> nn.Module:
    """Put a teacher in eval mode with gradients off.

    Dropout and batch-norm updates in the teacher would make its soft targets noisy and
    different from the logits it was validated with, and gradients into it would waste
    memory and could leak student updates into the teacher.
    """
    model.eval()
    model.requires_grad_(False)
    return model


def split_logits(model: nn.Module, splits, bf16_train: bool = False) -> dict[str, torch.Tensor]:
    """Compute the frozen teacher's logits on every split, once.

    Without augmentation the training inputs never change, so these logits are the same in
    every epoch. Caching them makes a distilled epoch cost about as much as a baseline epoch.
    ``bf16_train`` computes the training split's logits, the soft targets, under bfloat16
    autocast; the validation and test logits, which measure the teacher, stay float32.
    """
    freeze(model)
    return {
        "train": predict_logits(model, splits.x_train, bf16=bf16_train),
        "val": predict_logits(model, splits.x_val),
        "test": predict_logits(model, splits.x_test),
    }
