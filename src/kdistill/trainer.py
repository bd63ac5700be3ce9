"""The training loop shared by the teacher, the baseline student and the distilled student.

The data lives in memory as tensors, so there is no DataLoader and no per-example Python work.
Each epoch copies its shuffled rows in blocks of about a thousand and applies the model's input
transform once per block. A step then takes a contiguous slice of a block. Loss values stay on
the device until the end of the epoch: one host sync per epoch, not per step.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.metrics import accuracy

log = logging.getLogger(__name__)

# Examples per forward pass at evaluation. The 784-1200-1200-10 teacher ran at 200 GFLOP/s in
# chunks of 2048 or 4096 rows and at 177 in chunks of 8192, whose activations outgrow the cache.
EVAL_CHUNK = 4096
# Per-step matrix-multiply work each training thread needs (see step_threads). Measured on a
# 2-core Xeon with torch 2.13: a second thread cut the step of the 784-128-10 student at batch
# 128 (78 Mflop) from 1.37 to 1.06 ms. The 64-16-10 digits student (0.5 Mflop) gained nothing
# from it, and its steps took 50 to 100 times as long while another process kept both cores
# busy.
MIN_STEP_FLOPS_PER_THREAD = 2**25
# Rows gathered per block in an epoch: one gather and one standardization per block instead of
# per step. With 1024 rows (3 MB of Fashion-MNIST) the 784-128-10 student's step fell from
# 0.60 to 0.58 ms on a 2-core EPYC. Blocks of 8192 rows gained nothing, because they no longer
# fit in the cache.
BLOCK_ROWS = 1024


class DivergenceError(RuntimeError):
    """Training produced a NaN or infinite loss; the model is not saved."""


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
    bf16: bool = False  # bfloat16 autocast in the training forward pass, but evaluation in fp32


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


def predict_logits(
    model: nn.Module, x: torch.Tensor, chunk: int = EVAL_CHUNK, bf16: bool = False
) -> torch.Tensor:
    """Run ``model`` in eval mode without autograd; the caller's training flag is restored.

    ``bf16`` runs the forward pass under bfloat16 autocast; the logits come back as float32.
    """
    was_training = model.training
    model.eval()
    with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        parts = [model(x[i : i + chunk]) for i in range(0, len(x), chunk)]
    model.train(was_training)
    # A single chunk needs no concatenation copy.
    logits = parts[0] if len(parts) == 1 else torch.cat(parts)
    return logits.float()


def make_optimizer(model: nn.Module, hyper: Hyper) -> torch.optim.Optimizer:
    """Build the optimizer named by ``hyper``; ``hyper.fused`` selects torch's fused kernel."""
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
class _Soft:
    """Soft targets prepared once per run so that a step does no work on the teacher side.

    ``probs`` is softmax(teacher logits / T). ``entropy`` is the mean entropy of those rows,
    a constant: KL(p_t || p_s) = cross-entropy(p_t, p_s) - entropy(p_t), so a step only needs
    the cross-entropy, and the epoch adds the constant back for the logged KD loss.
    """

    probs: torch.Tensor
    entropy: float
    temperature: float
    alpha: float
    weights: tuple[torch.Tensor, torch.Tensor]  # (1 - alpha, alpha * T^2), the loss weights


def _prepare_soft(soft: SoftTargets) -> _Soft:
    # Same argument checks as kd_loss_parts, made once instead of every step.
    if not 0.0 <= soft.alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {soft.alpha}")
    if soft.temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {soft.temperature}")
    log_probs = F.log_softmax(soft.logits.detach().float() / soft.temperature, dim=-1)
    probs = log_probs.exp()
    entropy = -(probs.double() * log_probs.double()).sum(dim=-1).mean().item()
    weights = (
        torch.tensor(1.0 - soft.alpha),
        torch.tensor(soft.alpha * soft.temperature * soft.temperature),
    )
    return _Soft(probs.contiguous(), entropy, soft.temperature, soft.alpha, weights)


@dataclass
class _Step:
    """Per-run state of the optimizer steps: model parts, optimizer, schedule, targets, options.

    ``transform`` is the model's fixed input transform (the standardization), applied once per
    gathered block, and it may work in place. ``body`` is the rest of the model, which each step
    runs. Together they compute exactly what the whole model computes.
    """

    transform: Callable[[torch.Tensor], torch.Tensor] | None
    body: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    soft: _Soft | None
    params: list[torch.Tensor] = field(default_factory=list)
    bf16: bool = False


def _split_model(
    model: nn.Module,
) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, nn.Module]:
    """Return (fixed input transform or None, trainable body) for ``model``."""
    parts = getattr(model, "training_parts", None)
    return parts() if parts is not None else (None, model)


def _forward(ctx: _Step, xb: torch.Tensor) -> torch.Tensor:
    if not ctx.bf16:
        return ctx.body(xb)
    # Matrix multiplies run in bfloat16; the losses below still see float32 logits.
    with torch.autocast(xb.device.type, dtype=torch.bfloat16):
        return ctx.body(xb).float()


def _train_step(
    ctx: _Step, xb: torch.Tensor, yb: torch.Tensor, targets: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Take one optimizer step and return the detached (cross-entropy, soft cross-entropy).

    The soft term is the cross-entropy from softmax(teacher / T) to softmax(student / T). It
    has the gradient of the KL term of ``kd_loss_parts``, and it is None without soft targets.
    """
    logits = _forward(ctx, xb)
    ce = F.cross_entropy(logits, yb)
    # Dropping the gradients directly skips zero_grad's per-call bookkeeping.
    for param in ctx.params:
        param.grad = None
    soft = ctx.soft
    if soft is None:
        cross = None
        ce.backward()
    else:
        cross = F.cross_entropy(logits / soft.temperature, targets)
        # Backward from both terms with their loss weights as output gradients: the same
        # gradient as the weighted sum, without the sum's extra graph nodes.
        torch.autograd.backward((ce, cross), soft.weights)
    ctx.optimizer.step()
    if ctx.schedule is not None:
        ctx.schedule.step()
    return ce.detach(), None if cross is None else cross.detach()


def _gather_block(ctx: _Step, data: TrainData, rows: torch.Tensor, buffers: dict):
    """Copy the rows of one block out of the training split, inputs already transformed.

    The copies go into buffers reused for every block. With a fresh tensor per 8192-row block
    the student's step took 0.73 ms against 0.62 ms with one gather per step.
    """
    count = len(rows)
    x = torch.index_select(data.x_train, 0, rows, out=buffers["x"][:count])
    if ctx.transform is not None:
        with torch.no_grad():
            x = ctx.transform(x)
    y = torch.index_select(data.y_train, 0, rows, out=buffers["y"][:count])
    probs = None
    if ctx.soft is not None:
        probs = torch.index_select(ctx.soft.probs, 0, rows, out=buffers["probs"][:count])
    return x, y, probs


def _block_buffers(ctx: _Step, data: TrainData, block: int) -> dict[str, torch.Tensor]:
    rows = min(block, len(data.y_train))
    buffers = {
        "x": data.x_train.new_empty((rows, *data.x_train.shape[1:])),
        "y": data.y_train.new_empty((rows,)),
    }
    if ctx.soft is not None:
        buffers["probs"] = ctx.soft.probs.new_empty((rows, ctx.soft.probs.shape[1]))
    return buffers


def _run_epoch(ctx: _Step, data: TrainData, order: torch.Tensor, batch_size: int, bar):
    """Train one epoch over ``order`` and return the example-weighted means (loss, ce, kd).

    A step gets the same rows in the same order as with one gather per batch. The transform is
    elementwise, so a block gives the bytes that per-batch calls would give.
    """
    ce_parts: list[torch.Tensor] = []
    cross_parts: list[torch.Tensor] = []
    block = max(1, BLOCK_ROWS // batch_size) * batch_size
    buffers = _block_buffers(ctx, data, block)
    for block_start in range(0, len(order), block):
        rows = order[block_start : block_start + block]
        x, y, probs = _gather_block(ctx, data, rows, buffers)
        for start in range(0, len(y), batch_size):
            end = start + batch_size
            targets = None if probs is None else probs[start:end]
            ce, cross = _train_step(ctx, x[start:end], y[start:end], targets)
            # Losses stay tensors until the epoch ends: one host sync per epoch, not per step.
            ce_parts.append(ce)
            if cross is not None:
                cross_parts.append(cross)
            if bar is not None:
                bar.update(1)
    return _epoch_means(ctx.soft, ce_parts, cross_parts, len(order), batch_size)


def _epoch_means(
    soft: _Soft | None, ce_parts: list, cross_parts: list, count: int, batch_size: int
) -> torch.Tensor:
    """Weight each batch's mean by its size (only the last batch may be short)."""
    weights = torch.full((len(ce_parts),), float(batch_size), device=ce_parts[0].device)
    weights[-1] = count - batch_size * (len(ce_parts) - 1)
    ce = (torch.stack(ce_parts) * weights).sum() / count
    if soft is None:
        return torch.stack([ce, ce, torch.zeros(())])
    cross = (torch.stack(cross_parts) * weights).sum() / count
    kd = (cross - soft.entropy) * (soft.temperature * soft.temperature)
    loss = (1.0 - soft.alpha) * ce + soft.alpha * kd
    return torch.stack([loss, ce, kd])


def step_threads(model: nn.Module, batch_size: int, available: int) -> int:
    """Return how many of ``available`` threads one training step of ``model`` can use well.

    A training step runs dozens of kernels, and every kernel that runs in parallel ends in a
    barrier that waits for all threads. For a small model the barriers cost more than the split work
    saves, and on a machine shared with other processes each barrier can wait a scheduler
    time slice for a descheduled thread. So each thread needs ``MIN_STEP_FLOPS_PER_THREAD``
    of the step's matrix-multiply work (6 flops per parameter and example).
    """
    flops = 6 * batch_size * sum(p.numel() for p in model.parameters())
    return max(1, min(available, flops // MIN_STEP_FLOPS_PER_THREAD))


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
    the same initial weights see identical batches in identical order. The run uses at most
    ``torch.get_num_threads()`` threads, fewer for small models (``step_threads``), and
    restores the thread count on return.
    """
    available = torch.get_num_threads()
    threads = step_threads(model, hyper.batch_size, available)
    if threads == available:
        return _train(model, data, hyper, seed, name, soft, on_epoch)
    torch.set_num_threads(threads)
    try:
        return _train(model, data, hyper, seed, name, soft, on_epoch)
    finally:
        torch.set_num_threads(available)


def _train(
    model: nn.Module,
    data: TrainData,
    hyper: Hyper,
    seed: int,
    name: str,
    soft: SoftTargets | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> TrainResult:
    # setup
    torch.manual_seed(seed)
    order_rng = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(data.y_train) // hyper.batch_size)
    optimizer = make_optimizer(model, hyper)
    schedule = make_schedule(optimizer, hyper, hyper.epochs * steps_per_epoch)
    prepared = None if soft is None else _prepare_soft(soft)
    transform, body = _split_model(model)
    ctx = _Step(
        transform, body, optimizer, schedule, prepared, list(model.parameters()), hyper.bf16
    )
    best = TrainResult(state={}, best_epoch=0)
    best_accuracy = -1.0
    started = time.perf_counter()

    # train
    for epoch in range(1, hyper.epochs + 1):
        epoch_start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        # The order comes from a CPU generator, so it is the same on every device.
        order = torch.randperm(len(data.y_train), generator=order_rng).to(data.x_train.device)
        bar = _progress(steps_per_epoch, f"{name} {epoch}/{hyper.epochs}")
        means = _run_epoch(ctx, data, order, hyper.batch_size, bar).tolist()
        if bar is not None:
            bar.close()
        if not all(math.isfinite(value) for value in means[:2]):
            raise DivergenceError(
                f"{name} (seed {seed}): the training loss became {means[0]} in epoch {epoch}; "
                f"lower train.lr (now {hyper.lr:g}) or check the inputs for extreme values"
            )
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
