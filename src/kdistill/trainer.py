"""The training loop shared by the teacher, the baseline student and the distilled student.

The data lives in memory as tensors and each step takes its batch by index, so there is no
DataLoader and no per-example Python work. Loss values stay on the device until the end of
the epoch: one host sync per epoch, not per step.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.losses import kd_loss_parts
from kdistill.metrics import accuracy

log = logging.getLogger(__name__)

EVAL_CHUNK = 16384  # examples per forward pass at evaluation; large chunks amortize overhead


@dataclass
class Hyper:
    """Optimization settings for one model."""

    epochs: int
    lr: float
    batch_size: int
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    keep_best: bool = True
    fused: bool = False


@dataclass
class SoftTargets:
    """Cached teacher logits on the training split, aligned row by row with ``x_train``."""

    logits: torch.Tensor
    temperature: float
    alpha: float


@dataclass
class TrainData:
    """Tensors one training run needs; ``val_reference`` is the teacher's val argmax, if any."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    val_reference: torch.Tensor | None = None


@dataclass
class TrainResult:
    """The kept weights and the per-epoch history of one training run."""

    state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def predict_logits(model: nn.Module, x: torch.Tensor, chunk: int = EVAL_CHUNK) -> torch.Tensor:
    """Run ``model`` in eval mode without autograd; the caller's training flag is restored."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        parts = [model(x[i : i + chunk]) for i in range(0, len(x), chunk)]
    model.train(was_training)
    return torch.cat(parts).float()


def make_optimizer(model: nn.Module, hyper: Hyper) -> torch.optim.Optimizer:
    params = model.parameters()
    fused = {"fused": True} if hyper.fused else {}
    if hyper.optimizer == "adam":
        return torch.optim.Adam(params, lr=hyper.lr, weight_decay=hyper.weight_decay, **fused)
    if hyper.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=hyper.lr, weight_decay=hyper.weight_decay, **fused)
    return torch.optim.SGD(
        params, lr=hyper.lr, momentum=hyper.momentum, weight_decay=hyper.weight_decay, **fused
    )


def make_schedule(optimizer: torch.optim.Optimizer, hyper: Hyper, total_steps: int):
    if hyper.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if hyper.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=hyper.lr, total_steps=total_steps
        )
    return None


def _progress(total: int, description: str):
    """Return a tqdm bar on a terminal, or None when stderr is piped or a file."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, leave=False, unit="step", dynamic_ncols=True)


@dataclass
class _Step:
    """What one optimizer step needs besides the batch: the model, optimizer and targets."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    soft: SoftTargets | None


def _train_step(ctx: _Step, xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor):
    """Take one optimizer step; return (loss, ce_loss, kd_loss) as detached tensors."""
    logits = ctx.model(xb)
    if ctx.soft is None:
        loss = F.cross_entropy(logits, yb)
        ce, kd = loss, None
    else:
        teacher_logits = ctx.soft.logits[idx]
        loss, ce, kd = kd_loss_parts(
            logits, teacher_logits, yb, ctx.soft.temperature, ctx.soft.alpha
        )
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ctx.optimizer.step()
    if ctx.schedule is not None:
        ctx.schedule.step()
    return loss.detach(), ce.detach(), None if kd is None else kd.detach()


def _run_epoch(ctx: _Step, data: TrainData, order: torch.Tensor, batch_size: int, bar):
    """Train one epoch over ``order``; return summed (loss, ce, kd) weighted by batch size."""
    sums = torch.zeros(3)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        loss, ce, kd = _train_step(ctx, data.x_train[idx], data.y_train[idx], idx)
        weight = len(idx)
        sums[0] += loss * weight
        sums[1] += ce * weight
        if kd is not None:
            sums[2] += kd * weight
        if bar is not None:
            bar.update(1)
    return sums / len(order)


def train(
    model: nn.Module,
    data: TrainData,
    hyper: Hyper,
    seed: int,
    name: str,
    soft: SoftTargets | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place and return the kept weights and history.

    ``seed`` fixes the batch order and the dropout masks, so two calls with the same seed and
    the same initial weights see identical batches in identical order.
    """
    # setup
    torch.manual_seed(seed)
    order_rng = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(data.y_train) // hyper.batch_size)
    optimizer = make_optimizer(model, hyper)
    schedule = make_schedule(optimizer, hyper, hyper.epochs * steps_per_epoch)
    ctx = _Step(model, optimizer, schedule, soft)
    best = TrainResult(state={}, best_epoch=0)
    best_accuracy = -1.0
    started = time.perf_counter()

    # train
    for epoch in range(1, hyper.epochs + 1):
        epoch_start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        order = torch.randperm(len(data.y_train), generator=order_rng)
        bar = _progress(steps_per_epoch, f"{name} {epoch}/{hyper.epochs}")
        means = _run_epoch(ctx, data, order, hyper.batch_size, bar).tolist()
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - epoch_start

        # evaluate on validation only; the test split is never read while training
        val_logits = predict_logits(model, data.x_val)
        val_accuracy = accuracy(val_logits, data.y_val)
        record = {
            "model": name.split("/")[0], "seed": seed, "epoch": epoch,
            "loss": means[0], "ce_loss": means[1],
            "kd_loss": means[2] if soft is not None else None,
            "temperature": soft.temperature if soft is not None else None,
            "alpha": soft.alpha if soft is not None else None,
            "lr": lr, "val_accuracy": val_accuracy,
            "teacher_agreement": (
                accuracy(val_logits, data.val_reference)
                if data.val_reference is not None else None
            ),
            "samples_per_s": len(data.y_train) / seconds, "seconds": seconds,
        }  # fmt: skip
        best.history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if not hyper.keep_best or val_accuracy > best_accuracy:
            best_accuracy = val_accuracy
            best.best_epoch = epoch
            best.state = copy.deepcopy(model.state_dict())

    # keep the chosen epoch's weights in the model itself
    model.load_state_dict(best.state)
    best.seconds = time.perf_counter() - started
    return best
