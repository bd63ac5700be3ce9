"""Compare test accuracy of kdistill and the tutorial-style loop on paired seeds.

The speed benchmark (bench_distill.py) runs 3 rounds, too few to tell a small accuracy cost
of kdistill's shortcuts from seed noise. This script trains one teacher for the benchmark task
(kdistill, float32, seed 0) and then, for each seed, trains from the same initial student
weights:

- the hard-label baseline with kdistill's trainer and with the reference loop;
- the distilled student with kdistill (soft targets cached once, float32) and with the
  reference loop (the teacher's forward pass on every batch);
- the distilled student with kdistill on soft targets computed under bfloat16 autocast, as
  ``train.teacher_bf16`` computes them.

It reports each seed's test accuracy and paired Student-t intervals of the differences, and
writes the page ``benchmarks/accuracy_check.md``.

    python benchmarks/accuracy_check.py --seeds 8     # about 4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from bench_distill import build_models, reference_accuracy, reference_fit, task_config
from torch.utils.data import DataLoader, TensorDataset

from kdistill.data import load_splits
from kdistill.metrics import accuracy, paired_interval
from kdistill.pipeline import hyper_for
from kdistill.teachers import freeze
from kdistill.trainer import SoftTargets, TrainData, predict_logits, train

PAGE = Path(__file__).resolve().parent / "accuracy_check.md"
COLUMNS = (
    ("baseline_kdistill", "baseline, kdistill"),
    ("baseline_reference", "baseline, reference"),
    ("student_kdistill", "distilled, kdistill"),
    ("student_reference", "distilled, reference"),
    ("student_bf16_targets", "distilled, kdistill, bf16 soft targets"),
)
COMPARISONS = (
    ("baseline_kdistill", "baseline_reference", "baseline: kdistill - reference"),
    ("student_kdistill", "student_reference", "distilled: kdistill - reference"),
    ("student_bf16_targets", "student_kdistill", "distilled: bf16 - float32 soft targets"),
)


def seed_row(cfg, splits, teacher, logits: dict[str, torch.Tensor], seed: int) -> dict:
    """Train the five students of one seed and return their test accuracies."""
    _, initial = build_models(cfg, splits, seed)
    data = TrainData(splits.x_train, splits.y_train, splits.x_val, splits.y_val)
    hyper = hyper_for(cfg, teacher=False)
    temperature, alpha = cfg.distill.temperature, cfg.distill.alpha
    x_test, y_test = splits.x_test, splits.y_test

    def kdistill_student(soft: SoftTargets | None) -> float:
        model = copy.deepcopy(initial)
        train(model, data, hyper, seed, "student", soft)
        return accuracy(predict_logits(model, x_test), y_test)

    def reference_student(with_teacher: bool) -> float:
        model = copy.deepcopy(initial)
        generator = torch.Generator().manual_seed(seed)
        dataset = TensorDataset(splits.x_train, splits.y_train)
        loader = DataLoader(dataset, batch_size=hyper.batch_size, shuffle=True, generator=generator)
        reference_teacher = teacher if with_teacher else None
        reference_fit(model, loader, hyper.epochs, hyper.lr, reference_teacher, temperature, alpha)
        return reference_accuracy(model, x_test, y_test)

    return {
        "seed": seed,
        "baseline_kdistill": kdistill_student(None),
        "baseline_reference": reference_student(with_teacher=False),
        "student_kdistill": kdistill_student(SoftTargets(logits["fp32"], temperature, alpha)),
        "student_reference": reference_student(with_teacher=True),
        "student_bf16_targets": kdistill_student(SoftTargets(logits["bf16"], temperature, alpha)),
    }


def render(rows: list[dict], teacher_accuracy: float, logit_gap: float, args) -> str:
    header = "| seed | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [header, "|---" * (len(COLUMNS) + 1) + "|"]
    for row in rows:
        cells = [f"{100 * row[key]:.2f}" for key, _ in COLUMNS]
        lines.append(f"| {row['seed']} | " + " | ".join(cells) + " |")
    summary = ["| comparison | mean (points) | 95 % CI (points) |", "|---|---|---|"]
    for treatment, control, label in COMPARISONS:
        interval = paired_interval([r[treatment] for r in rows], [r[control] for r in rows])
        span = f"[{100 * interval.low:+.2f}, {100 * interval.high:+.2f}]"
        summary.append(f"| {label} | {100 * interval.mean:+.2f} | {span} |")
    page = [
        "# Accuracy of kdistill against the tutorial loop, on paired seeds",
        "",
        "Written by `python benchmarks/accuracy_check.py "
        f"--seeds {args.seeds}` (torch {torch.__version__}, {torch.get_num_threads()} threads).",
        "The task is the speed benchmark's (see [README.md](README.md)): Fashion-MNIST, student",
        "784-128-10, batch 128, Adam lr 1e-3, 5 epochs, T = 4, alpha = 0.9. One teacher",
        f"(784-1200-1200-10, trained by kdistill in float32, test accuracy {teacher_accuracy:.4f})",
        "serves every seed, and each seed's students start from the same initial weights. The",
        "reference loop runs the teacher on every batch; kdistill caches its logits once. The",
        "bfloat16 soft targets are the same teacher's training-split logits computed under",
        "bfloat16 autocast, as `train.teacher_bf16: true` computes them; the largest",
        f"difference from the float32 logits is {logit_gap:.3f}.",
        "",
        "Test accuracy (%):",
        "",
        *lines,
        "",
        "Paired differences over the seeds (Student-t interval):",
        "",
        *summary,
        "",
        "An interval that includes zero means no difference was measured at this number of",
        "seeds; its ends bound how large a difference these seeds could have missed.",
        "",
    ]
    return "\n".join(page)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", type=int, default=8, help="number of paired seeds 1..N, at least 2 (default 8)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--output", type=Path, default=PAGE, help=f"page to write ({PAGE})")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error(f"--seeds {args.seeds}: an interval needs at least 2 seeds")
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    cfg = task_config(args.threads, quick=False, train_overrides={})
    splits = load_splits(cfg.data, 0)
    teacher, _ = build_models(cfg, splits, 0)
    data = TrainData(splits.x_train, splits.y_train, splits.x_val, splits.y_val)
    train(teacher, data, hyper_for(cfg, teacher=True), 0, "teacher")
    freeze(teacher)
    logits = {
        "fp32": predict_logits(teacher, splits.x_train),
        "bf16": predict_logits(teacher, splits.x_train, bf16=True),
    }
    logit_gap = (logits["bf16"] - logits["fp32"]).abs().max().item()
    teacher_accuracy = accuracy(predict_logits(teacher, splits.x_test), splits.y_test)
    print(f"teacher test accuracy {teacher_accuracy:.4f}", file=sys.stderr, flush=True)

    rows = []
    for seed in range(1, args.seeds + 1):
        rows.append(seed_row(cfg, splits, teacher, logits, seed))
        accuracies = " ".join(f"{key} {rows[-1][key]:.4f}" for key, _ in COLUMNS)
        print(f"seed {seed}: {accuracies}", file=sys.stderr, flush=True)

    page = render(rows, teacher_accuracy, logit_gap, args)
    args.output.write_text(page, encoding="utf-8")
    print(page)
    print(f"wrote {args.output} in {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
