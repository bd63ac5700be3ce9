"""Choose temperature and alpha for a config on the validation split only.

Trains the config's teacher once, then for every (T, alpha) in the grid trains the distilled
student on each paired seed and records its validation accuracy next to the baseline's. The
test split is never evaluated here; the chosen pair goes into the config, and only then does
`kdistill run` read the test split.

    python benchmarks/select_on_validation.py configs/digits.yaml \
        --temperatures 2 4 8 --alphas 0.5 0.9 --seeds 3 [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from kdistill import config as config_module
from kdistill.data import load_splits
from kdistill.metrics import accuracy
from kdistill.models import build_model, model_spec
from kdistill.pipeline import eval_seeds, hyper_for, load_teacher
from kdistill.teachers import split_logits
from kdistill.trainer import SoftTargets, TrainData, predict_logits, train


def val_accuracy(model, splits) -> float:
    return accuracy(predict_logits(model, splits.x_val), splits.y_val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[2, 4, 8])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--output", default=None, help="write the table as JSON here")
    parser.add_argument(
        "--teacher",
        default=None,
        help="reuse a saved teacher (a run folder or teacher folder) instead of training one",
    )
    args = parser.parse_args()

    cfg = config_module.load(args.config, args.overrides)
    torch.set_num_threads(cfg.threads())
    splits = load_splits(cfg.data, cfg.run.seed)
    data = TrainData(splits.x_train, splits.y_train, splits.x_val, splits.y_val)

    # teacher, trained once exactly as `kdistill run` trains it, or loaded
    started = time.perf_counter()
    if args.teacher:
        teacher = load_teacher(args.teacher, splits, cfg)
    else:
        torch.manual_seed(cfg.run.seed)
        spec = model_spec(cfg.teacher, splits.num_features, splits.num_classes)
        teacher = build_model(spec, splits.mean, splits.std)
        train(teacher, data, hyper_for(cfg, True), cfg.run.seed, "teacher")
    logits = split_logits(teacher, splits, cfg.teacher_bf16)
    print(
        f"teacher val accuracy {accuracy(logits['val'], splits.y_val):.4f} "
        f"({time.perf_counter() - started:.0f} s)",
        flush=True,
    )

    # paired students: the same initial weights for the baseline and every (T, alpha)
    seeds = eval_seeds(cfg)[: args.seeds]
    spec = model_spec(cfg.student, splits.num_features, splits.num_classes)
    hyper = hyper_for(cfg, False)
    rows: dict[str, list[float]] = {"baseline": []}
    for seed in seeds:
        torch.manual_seed(seed)
        initial = build_model(spec, splits.mean, splits.std)
        model = copy.deepcopy(initial)
        train(model, data, hyper, seed, "baseline")
        rows["baseline"].append(val_accuracy(model, splits))
        for temperature in args.temperatures:
            for alpha in args.alphas:
                soft = SoftTargets(logits["train"], temperature, alpha)
                model = copy.deepcopy(initial)
                train(model, data, hyper, seed, "student", soft)
                rows.setdefault(f"T={temperature:g} alpha={alpha:g}", []).append(
                    val_accuracy(model, splits)
                )
        print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)", flush=True)

    # report: mean validation accuracy and the mean paired gain over the baseline
    print(f"\n{'setting':<22} {'val accuracy':>12} {'gain vs baseline':>17}")
    for name, values in sorted(rows.items(), key=lambda item: -statistics.mean(item[1])):
        gain = statistics.mean(v - b for v, b in zip(values, rows["baseline"], strict=True))
        print(f"{name:<22} {statistics.mean(values):>12.4f} {100 * gain:>+16.2f}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as stream:
            json.dump({"seeds": seeds, "val_accuracy": rows}, stream, indent=2)


if __name__ == "__main__":
    main()
