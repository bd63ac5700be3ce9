"""Time kdistill's distillation against a tutorial-style PyTorch loop on Fashion-MNIST.

The task: teacher MLP 784-1200-1200-10 (ReLU, dropout 0.2), student MLP 784-128-10, batch 128,
Adam at lr 1e-3, 5 epochs each, T = 4, alpha = 0.9. Each implementation trains the teacher,
the hard-label baseline student and the distilled student from the same initial weights, in
its own subprocess, so that peak memory is measured per implementation. Implementations run
alternately for ``--rounds`` rounds. Round r uses seed r for every implementation, so the
spread of test accuracies over rounds is the run-to-run noise. The same run measures the fp32
matrix-multiply throughput and the wall time of ``kdistill run`` with the digits defaults, then
writes ``benchmarks/README.md``.

    python benchmarks/bench_distill.py              # full run, about 15 minutes on 2 cores
    python benchmarks/bench_distill.py --quick      # smoke check on a subset, under a minute
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdistill import config as config_module
from kdistill.data import load_splits
from kdistill.metrics import accuracy
from kdistill.models import build_model, count_params, model_spec
from kdistill.pipeline import hyper_for
from kdistill.teachers import freeze
from kdistill.trainer import SoftTargets, TrainData, predict_logits, train

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
COMMAND = "python benchmarks/bench_distill.py --rounds 3"

# The kdistill variants: overrides of the train section on top of the task settings.
VARIANTS: dict[str, dict[str, Any]] = {
    "kdistill": {},
    "kdistill-bf16-teacher": {"teacher_bf16": True},
    "kdistill-bf16": {"bf16": True},
    "kdistill-unfused": {"fused": False},
}
# The faster path whose targets the page reports beside the float32 default.
FAST = "kdistill-bf16-teacher"
QUICK_TRAIN_LIMIT = 6000


def task_config(threads: int, quick: bool, train_overrides: dict[str, Any]) -> config_module.Config:
    """Build the benchmark task as a kdistill config. ``quick`` shrinks data and epochs."""
    epochs = 1 if quick else 5
    raw = {
        # 10 % of the 60 000 training images are held out for kdistill's per-epoch validation,
        # and both implementations train on the same remaining 54 000.
        "data": {
            "name": "fashion-mnist",
            "val_fraction": 0.1,
            "train_limit": QUICK_TRAIN_LIMIT if quick else 0,
        },
        "teacher": {"hidden": [1200, 1200], "dropout": 0.2, "input_dropout": 0.0},
        "student": {"hidden": [128], "dropout": 0.0},
        "train": {
            "epochs": epochs,
            "teacher_epochs": epochs,
            "batch_size": 128,
            "optimizer": "adam",
            "lr": 1e-3,
            "schedule": "constant",
            # The reference keeps its last epoch, so kdistill does too.
            "keep_best": False,
            **train_overrides,
        },
        "distill": {"temperature": 4.0, "alpha": 0.9},
        "run": {"threads": threads},
    }
    return config_module.from_dict(raw)


def build_models(cfg: config_module.Config, splits, seed: int) -> tuple[nn.Module, nn.Module]:
    """Return (teacher, student) with the initial weights both implementations share."""
    features, classes = splits.num_features, splits.num_classes
    torch.manual_seed(seed)
    teacher = build_model(model_spec(cfg.teacher, features, classes), splits.mean, splits.std)
    torch.manual_seed(seed + 1)
    student = build_model(model_spec(cfg.student, features, classes), splits.mean, splits.std)
    return teacher, student


class PhaseClock:
    """Wall and CPU seconds of consecutive named phases."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}

    def measure(self, name: str, work, repeats: int = 1):
        """Run ``work`` ``repeats`` times, keep the fastest run's seconds, return its result.

        Every caller passes deterministic work, so each run returns the same result.
        """
        for _ in range(repeats):
            usage = resource.getrusage(resource.RUSAGE_SELF)
            started = time.perf_counter()
            result = work()
            seconds = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_SELF)
            record = {
                "wall_s": seconds,
                "user_s": after.ru_utime - usage.ru_utime,
                "sys_s": after.ru_stime - usage.ru_stime,
            }
            if name not in self.phases or seconds < self.phases[name]["wall_s"]:
                self.phases[name] = record
        return result


# step: the reference, written the way the PyTorch knowledge-distillation tutorial trains


def reference_fit(
    model: nn.Module,
    loader: DataLoader,
    epochs: int,
    lr: float,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
) -> float:
    """Train with a DataLoader. With a teacher, run it on every batch for the soft targets."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if teacher is not None:
        teacher.eval()
    model.train()
    running_loss = 0.0
    for _ in range(epochs):
        running_loss = 0.0
        for inputs, labels in loader:
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = F.cross_entropy(outputs, labels)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(inputs)
                log_p_student = F.log_softmax(outputs / temperature, dim=-1)
                log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
                soft = F.kl_div(
                    log_p_student, log_p_teacher, reduction="batchmean", log_target=True
                )
                loss = (1.0 - alpha) * loss + alpha * temperature**2 * soft
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / len(loader)


def reference_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for inputs, labels in DataLoader(TensorDataset(x, y), batch_size=128):
            correct += (model(inputs).argmax(dim=1) == labels).sum().item()
    return correct / len(y)


def run_reference(cfg: config_module.Config, seed: int, repeats: int) -> dict[str, Any]:
    clock = PhaseClock()
    splits = clock.measure("data", lambda: load_splits(cfg.data, 0))
    teacher, initial = build_models(cfg, splits, seed)
    dataset = TensorDataset(splits.x_train, splits.y_train)
    epochs, lr, distill = cfg.train.epochs, cfg.train.lr, cfg.distill

    def loader() -> DataLoader:
        # A fresh generator per phase, so that every repeat of a phase gets the same batches.
        generator = torch.Generator().manual_seed(seed)
        batch = cfg.train.batch_size
        return DataLoader(dataset, batch_size=batch, shuffle=True, generator=generator)

    def fit_copy(with_teacher: bool) -> nn.Module:
        model = copy.deepcopy(initial)
        teacher_model = teacher if with_teacher else None
        reference_fit(
            model, loader(), epochs, lr, teacher_model, distill.temperature, distill.alpha
        )
        return model

    clock.measure("teacher", lambda: reference_fit(teacher, loader(), epochs, lr))
    baseline = clock.measure("baseline", lambda: fit_copy(False), repeats)
    student = clock.measure("student", lambda: fit_copy(True), repeats)
    x_test, y_test = splits.x_test, splits.y_test
    return {
        "phases": clock.phases,
        "accuracy": {
            "teacher": reference_accuracy(teacher, x_test, y_test),
            "baseline": reference_accuracy(baseline, x_test, y_test),
            "student": reference_accuracy(student, x_test, y_test),
        },
    }


# step: kdistill through its library calls, as the pipeline makes them


def run_kdistill(cfg: config_module.Config, seed: int, repeats: int) -> dict[str, Any]:
    clock = PhaseClock()
    splits = clock.measure("data", lambda: load_splits(cfg.data, 0))
    teacher, initial = build_models(cfg, splits, seed)
    data = TrainData(splits.x_train, splits.y_train, splits.x_val, splits.y_val)
    teacher_hyper, student_hyper = hyper_for(cfg, True), hyper_for(cfg, False)
    clock.measure("teacher", lambda: train(teacher, data, teacher_hyper, seed, "teacher"))
    freeze(teacher)
    # Distillation needs the teacher's logits on the training split only. Its test logits
    # measure the teacher, like the reference's untimed accuracy pass, so they are not timed.
    bf16 = cfg.teacher_bf16
    train_logits = clock.measure(
        "logits", lambda: predict_logits(teacher, splits.x_train, bf16=bf16), repeats
    )
    soft = SoftTargets(train_logits, cfg.distill.temperature, cfg.distill.alpha)

    def train_copy(targets: SoftTargets | None) -> nn.Module:
        model = copy.deepcopy(initial)
        name = "baseline" if targets is None else "student"
        train(model, data, student_hyper, seed, name, targets)
        return model

    baseline = clock.measure("baseline", lambda: train_copy(None), repeats)
    student = clock.measure("student", lambda: train_copy(soft), repeats)
    x_test, y_test = splits.x_test, splits.y_test
    return {
        "phases": clock.phases,
        "accuracy": {
            "teacher": accuracy(predict_logits(teacher, x_test), y_test),
            "baseline": accuracy(predict_logits(baseline, x_test), y_test),
            "student": accuracy(predict_logits(student, x_test), y_test),
        },
        "sizes": splits.sizes(),
        "params": {"teacher": count_params(teacher), "student": count_params(student)},
    }


def run_matmul(quick: bool) -> dict[str, Any]:
    """Measure fp32 square matrix-multiply throughput; the best size is the machine's rate."""
    sizes = (512, 1024) if quick else (1024, 2048, 4096)
    rates = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        flops = 2.0 * n**3
        a @ b  # warm-up: thread pool and MKL buffers
        repeats = max(1, int(5e10 / flops))  # an estimated 0.2 s per timing at 250 GFLOP/s
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(repeats):
                a @ b
            timings.append((time.perf_counter() - started) / repeats)
        rates[str(n)] = flops / statistics.median(timings) / 1e9
    return {"gflops": max(rates.values()), "by_size": rates, "bf16_gflops": bf16_rate(quick)}


def bf16_rate(quick: bool) -> float:
    """Measure bfloat16 multiplies of a 128-row batch by a 1200 x 1200 layer, the teacher's."""
    a = torch.randn(128, 1200).bfloat16()
    b = torch.randn(1200, 1200).bfloat16()
    a @ b  # warm-up
    repeats = 20 if quick else 200
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        timings.append((time.perf_counter() - started) / repeats)
    return 2.0 * 128 * 1200 * 1200 / statistics.median(timings) / 1e9


def worker(args: argparse.Namespace) -> None:
    """Run one implementation in this process and print its result as one JSON line."""
    torch.set_num_threads(args.threads)
    if args.worker == "matmul":
        result = run_matmul(args.quick)
    elif args.worker == "reference":
        result = run_reference(task_config(args.threads, args.quick, {}), args.seed, args.repeats)
    else:
        cfg = task_config(args.threads, args.quick, VARIANTS[args.worker])
        result = run_kdistill(cfg, args.seed, args.repeats)
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))


# step: the parent process: scheduling, peak memory, summary and the results page


def spawn(command: list[str], env: dict[str, str] | None = None) -> tuple[str, float, float]:
    """Run ``command``; return (stdout, wall seconds, peak resident memory in MiB)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {process.returncode}")
    return stdout, seconds, usage.ru_maxrss / 1024  # Linux reports ru_maxrss in KiB


def spawn_worker(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", name, "--seed", str(seed)]
    command += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
    command += ["--quick"] if args.quick else []
    load_before = os.getloadavg()[0]
    stdout, seconds, peak_mib = spawn(command)
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(wall_s=seconds, peak_mib=peak_mib, load_before=load_before)
    return result


def time_cli_run(quick: bool) -> dict[str, Any]:
    """Time ``kdistill run --out TMP`` with the built-in digits defaults, as a user runs it."""
    with tempfile.TemporaryDirectory(prefix="kdistill-bench-") as folder:
        command = [sys.executable, "-m", "kdistill.cli", "run", "--out", f"{folder}/run"]
        if quick:
            command += ["train.epochs=2", "train.teacher_epochs=2", "eval.seeds=2"]
        _, seconds, peak_mib = spawn(command, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return {"wall_s": seconds, "peak_mib": peak_mib, "quick": quick}


def collect(args: argparse.Namespace) -> dict[str, Any]:
    names = ["reference", *VARIANTS] if not args.quick else ["reference", "kdistill", FAST]
    rounds: list[dict[str, Any]] = []
    for round_index in range(args.rounds):
        # Alternate the order so that neither side always runs first on a drifting machine.
        order = names if round_index % 2 == 0 else list(reversed(names))
        results = {"matmul": spawn_worker("matmul", round_index, args)}
        for name in order:
            results[name] = spawn_worker(name, round_index, args)
            wall = results[name]["wall_s"]
            print(f"round {round_index + 1}/{args.rounds} {name:<17} {wall:6.1f} s", flush=True)
        rounds.append(results)
    cli = [time_cli_run(args.quick) for _ in range(args.cli_runs)]
    return {"rounds": rounds, "names": names, "cli": cli}


def median_of(rounds: list[dict], name: str, *keys: str) -> float:
    values = []
    for results in rounds:
        value: Any = results[name]
        for key in keys:
            value = value[key]
        values.append(value)
    return statistics.median(values)


def distill_phase(result: dict[str, Any]) -> float:
    """Distilled-student seconds including the teacher's logits, wherever they are computed."""
    phases = result["phases"]
    return phases["student"]["wall_s"] + phases.get("logits", {"wall_s": 0.0})["wall_s"]


def summarize(measured: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Reduce the rounds to medians, ratios and the targets' verdicts."""
    rounds, names = measured["rounds"], measured["names"]
    sample = rounds[0]["kdistill"]
    train_count = sample["sizes"]["train"]
    epochs = 1 if args.quick else 5
    teacher_params, student_params = sample["params"]["teacher"], sample["params"]["student"]
    gflops = median_of(rounds, "matmul", "gflops")
    bf16_gflops = median_of(rounds, "matmul", "bf16_gflops")

    rows = {}
    for name in names:
        per_round = [r[name] for r in rounds]
        rows[name] = {
            phase: statistics.median(r["phases"][phase]["wall_s"] for r in per_round)
            for phase in per_round[0]["phases"]
        }
        rows[name]["distill"] = statistics.median(distill_phase(r) for r in per_round)
        rows[name]["peak_mib"] = max(r["peak_mib"] for r in per_round)
        rows[name]["sys_s"] = statistics.median(
            sum(p["sys_s"] for p in r["phases"].values()) for r in per_round
        )
        for model in ("teacher", "baseline", "student"):
            values = [r["accuracy"][model] for r in per_round]
            rows[name][f"acc_{model}"] = statistics.mean(values)
            rows[name][f"acc_{model}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        teacher_flops = 6.0 * teacher_params * train_count * epochs
        rows[name]["teacher_fraction"] = teacher_flops / rows[name]["teacher"] / (gflops * 1e9)

    # The arithmetic floor: one teacher forward pass (2 flops per parameter and example) over
    # the training split plus the student epochs (6 per parameter and example), at the
    # measured matrix-multiply rate.
    floor_flops = 2.0 * teacher_params * train_count + 6.0 * student_params * train_count * epochs
    floor_s = floor_flops / (gflops * 1e9)
    reference = rows["reference"]
    cli_wall = statistics.median(c["wall_s"] for c in measured["cli"]) if measured["cli"] else None
    ratios = {
        name: {
            "distill_speedup": reference["distill"] / rows[name]["distill"],
            "student_over_baseline": rows[name]["student"] / rows[name]["baseline"],
            "distill_over_baseline": rows[name]["distill"] / rows[name]["baseline"],
        }
        for name in names
        if name != "reference"
    }
    ratios["floor_speedup"] = reference["distill"] / floor_s
    compared = [name for name in ("kdistill", FAST) if name in rows]
    targets = [target_row(label, [rows[n] | ratios[n] for n in compared], cli_wall, args.quick)
               for label in TARGETS]  # fmt: skip
    return {
        "rows": rows, "ratios": ratios, "targets": targets, "compared": compared,
        "gflops": gflops, "bf16_gflops": bf16_gflops,
        "floor_s": floor_s, "cli_wall": cli_wall, "train_count": train_count,
        "params": sample["params"], "epochs": epochs,
    }  # fmt: skip


TARGETS = (
    "distilled phase vs reference",
    "distilled / baseline student time",
    "teacher training / matmul throughput",
    "`kdistill run`, digits defaults",
    "peak memory, kdistill Fashion-MNIST run",
)


def target_row(
    label: str, measured: list[dict[str, float]], cli_wall: float | None, quick: bool
) -> tuple:
    """Return (label, [(value text, met) per compared implementation], required)."""
    cells = []
    for row in measured:
        if label == TARGETS[0]:
            cell = (f"{row['distill_speedup']:.2f}x faster", row["distill_speedup"] >= 6.0)
        elif label == TARGETS[1]:
            ratio = row["student_over_baseline"]
            cell = (f"{ratio:.2f}x", ratio <= 1.15)
        elif label == TARGETS[2]:
            cell = (f"{row['teacher_fraction']:.0%}", row["teacher_fraction"] >= 0.60)
        elif label == TARGETS[3]:
            # `kdistill run` is timed with the defaults only, so one figure serves both columns.
            wall_text = "-" if cli_wall is None else f"{cli_wall:.1f} s"
            if quick:
                wall_text += " (quick: 2 epochs, 2 seeds)"
            cell = (wall_text, cli_wall is not None and cli_wall <= 60.0)
        else:
            cell = (f"{row['peak_mib'] / 1024:.2f} GiB", row["peak_mib"] <= 1.5 * 1024)
        cells.append(cell)
    required = (">= 6x", "<= 1.15x", ">= 60 %", "<= 60 s", "<= 1.5 GiB")[TARGETS.index(label)]
    return label, cells, required


def machine_description() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            for line in stream:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores available, {platform.system()} {platform.release()}"


# Facts from separate timings on a 2-core AMD EPYC (torch 2.13.0, 2 threads), the machine of
# the committed run. They explain where the time goes and why the defaults are what they are.
NOTES = [
    "## Where the time goes",
    "",
    "Timed apart from the benchmark, on a 2-core AMD EPYC with torch 2.13.0 and 2 threads (the",
    "machine of the committed run; minimum epoch time over 3 alternating repeats, divided by",
    "the steps):",
    "",
    "- Teacher step, fp32: 12.7 ms with `nn.Dropout`, 11.1 ms with kdistill's `Dropout`.",
    "  `nn.Dropout` draws one random number per element with `bernoulli_`, 1.0 ms per",
    "  128 x 1200 mask; kdistill's draws 16 bits per element, 0.2 ms per mask (see",
    "  `kdistill.models.Dropout`). The rest is mostly matrix multiplies, which run at 175 to",
    "  210 GFLOP/s for the teacher's shapes, about the square-matrix rate of this machine.",
    "- Teacher step, bfloat16 autocast: 4.8 to 5.6 ms. Adam, the dropout masks and the casts",
    "  stay in float32 time; the multiplies run at 3 to 4 times the float32 rate.",
    "- Teacher logits over the training split: 1.3 to 1.4 s in float32 (chunks of 4096 rows ran",
    "  at 200 GFLOP/s, chunks of 8192 at 177), 0.4 s under bfloat16 autocast. The largest",
    "  logit differs by about 0.01 between the two on an untrained teacher.",
    "- Student step, fp32: about 0.58 ms, of which the five matrix multiplies take 0.30 ms",
    "  in a bare loop; autograd, Adam (about 0.07 ms) and the loss take the rest. Timed alone",
    "  on 128 x 10 logits, the soft-target term adds about 45 µs per step to the hard-label",
    "  loss and its backward pass, so the distilled student costs about 8 % more per step.",
    "  One custom autograd function for both terms took 116 µs against 101 µs, and a",
    "  hand-written soft-target gradient saved about 10 µs, so kdistill keeps the plain form.",
    "  Gathering 1024 shuffled rows at a time and standardizing them once, instead of per step,",
    "  took the step from 0.60 to 0.58 ms with the same bytes out.",
    "- Accuracy over more seeds than the 3 rounds here: `benchmarks/accuracy_check.py`",
    "  trains kdistill's and the reference's students from the same weights on 8 paired",
    "  seeds, with float32 and bfloat16 soft targets (see `accuracy_check.md`).",
    "- On an earlier Intel Xeon machine, glibc's `M_MMAP_THRESHOLD` (32 MiB) and",
    "  `M_TRIM_THRESHOLD` (1 GiB) set with `mallopt` changed nothing measurable (teacher",
    "  30.3 s against 30.1 s), so kdistill does not set them.",
    "",
]


PHASES = (
    ("teacher", "teacher training"),
    ("logits", "teacher logits, once"),
    ("baseline", "baseline student"),
    ("student", "distilled student"),
    ("distill", "distilled phase incl. logits"),
)


def results_table(summary: dict[str, Any], names: list[str]) -> list[str]:
    rows = summary["rows"]
    lines = ["| phase (median s) | " + " | ".join(names) + " |"]
    lines.append("|---" * (len(names) + 1) + "|")
    for key, label in PHASES:
        cells = [f"{rows[n][key]:.2f}" if key in rows[n] else "-" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    fraction = [f"{rows[n]['teacher_fraction']:.0%}" for n in names]
    lines.append("| teacher, share of matmul rate | " + " | ".join(fraction) + " |")
    for model in ("teacher", "baseline", "student"):
        cells = [f"{rows[n][f'acc_{model}']:.4f} ± {rows[n][f'acc_{model}_sd']:.4f}" for n in names]
        lines.append(f"| test accuracy, {model} | " + " | ".join(cells) + " |")
    memory = [f"{rows[n]['peak_mib']:.0f}" for n in names]
    lines.append("| peak memory (MiB, max) | " + " | ".join(memory) + " |")
    system = [f"{rows[n]['sys_s']:.2f}" for n in names]
    lines.append("| system CPU time (s) | " + " | ".join(system) + " |")
    return lines


def raw_lines(measured: dict[str, Any]) -> list[str]:
    lines = []
    for index, results in enumerate(measured["rounds"]):
        lines.append(f"round {index + 1}: matmul {results['matmul']['gflops']:.1f} GFLOP/s")
        for name in measured["names"]:
            result = results[name]
            phases = " ".join(f"{k} {v['wall_s']:.2f}" for k, v in result["phases"].items())
            accuracies = " ".join(f"{k} {v:.4f}" for k, v in result["accuracy"].items())
            lines.append(
                f"  {name:<17} {phases} | acc {accuracies} | peak {result['peak_mib']:.0f} MiB"
                f" | load average {result['load_before']:.2f}"
            )
    for run in measured["cli"]:
        lines.append(f"kdistill run (digits defaults): {run['wall_s']:.1f} s wall")
    return lines


def render_page(measured: dict[str, Any], summary: dict[str, Any], args) -> str:
    names = measured["names"]
    ratios = summary["ratios"]
    params = summary["params"]
    compared = summary["compared"]
    target_lines = ["| target | " + " | ".join(f"`{n}`" for n in compared) + " | required |"]
    target_lines.append("|---" * (len(compared) + 2) + "|")
    for label, cells, required in summary["targets"]:
        verdicts = [f"{value} ({'met' if met else 'missed'})" for value, met in cells]
        target_lines.append(f"| {label} | " + " | ".join(verdicts) + f" | {required} |")
    epochs_text = "1 epoch" if summary["epochs"] == 1 else f"{summary['epochs']} epochs"
    quick_note = [
        f"**Quick mode ({QUICK_TRAIN_LIMIT} training images, 1 epoch): a smoke check. The",
        "targets below apply to the full run only.**",
        "",
    ]
    page = [
        "# Distillation speed benchmark",
        "",
        *(quick_note if args.quick else []),
        "`bench_distill.py` times kdistill against a reference loop written the way the PyTorch",
        "knowledge-distillation tutorial trains: a `DataLoader` over a `TensorDataset` with",
        "shuffling, the teacher's forward pass on every batch, `Adam` with torch's default",
        "implementation and one `loss.item()` per step. Both sides build their models with",
        "`kdistill.models.build_model` from the same seeds, so they start from the same weights,",
        "and both minimize (1 - alpha) CE + alpha T^2 KL(teacher || student).",
        "",
        "Task: Fashion-MNIST with pixels in [0, 1], flattened. Both sides train on the same",
        f"{summary['train_count']} images, because 10 % of the 60 000 are held out as kdistill's",
        "validation split, and test on the 10 000 test images. The teacher is 784-1200-1200-10",
        f"({params['teacher']} parameters, ReLU, dropout 0.2), the student 784-128-10",
        f"({params['student']} parameters). Batch 128, Adam lr 1e-3, {epochs_text}",
        f"each, T = 4, alpha = 0.9, {args.threads} threads. kdistill keeps the last epoch, as",
        "the reference does.",
        "",
        "Reproduce with:",
        "",
        "```",
        COMMAND,
        "```",
        "",
        f"The numbers below come from one invocation with {args.rounds} rounds on a shared "
        "2-core machine,",
        "where other jobs ran at times, so single timings drift; each round runs every",
        "implementation once, in alternating order, each in its own process. Round r uses seed",
        "r, so the ± on accuracies (standard deviation over rounds) is the run-to-run noise.",
        f"Within a round the student phases and the logits pass run {args.repeats} times, on",
        "both sides, and the fastest run counts: a phase of one or two seconds drifts by more",
        "than the 15 % that the student-time target allows. Teacher training runs once.",
        "",
        f"- machine: {machine_description()}",
        f"- torch {torch.__version__}, {args.threads} threads",
        f"- fp32 matrix-multiply rate: {summary['gflops']:.0f} GFLOP/s (median over rounds of "
        "the best square size)",
        "",
        "## Targets",
        "",
        *target_lines,
        "",
        f"The arithmetic floor for the distilled phase is {summary['floor_s']:.2f} s: the",
        "teacher's forward pass over the training split (2 flops per parameter and example) plus",
        "the student epochs (6 per parameter and example) at the measured float32",
        f"matrix-multiply rate. The reference takes {ratios['floor_speedup']:.1f}x that floor, so",
        f"no float32 implementation can be more than {ratios['floor_speedup']:.1f}x faster than",
        "the reference on this machine. The bfloat16 teacher path lowers the floor, because this",
        f"CPU multiplies bfloat16 at {summary['bf16_gflops']:.0f} GFLOP/s. Teacher training",
        "counts 6 x parameters x examples flops per epoch. With the defaults, the distilled",
        f"student trains {ratios['kdistill']['student_over_baseline']:.2f}x as long as the",
        "baseline; with its share of the teacher logits, "
        f"{ratios['kdistill']['distill_over_baseline']:.2f}x.",
        "",
        f"`{FAST}` differs from the default in the teacher only: both train their",
        "students with the same float32 code, so their student-time ratios differ by",
        "run-to-run noise alone.",
        "",
        "The `logits` row times the teacher's forward pass over the training split, which is",
        "what distillation needs. Its test-split logits only measure the teacher, like the",
        "reference's accuracy pass, and neither side's timing includes them.",
        "",
        "## Medians",
        "",
        *results_table(summary, names),
        "",
        "`kdistill-bf16-teacher` sets `train.teacher_bf16: true`: bfloat16 autocast for the",
        "teacher's training and for its logits on the training split, while the students train",
        "in float32 and every evaluation stays float32. `kdistill-bf16` sets `train.bf16: true`,",
        "which also puts the students' training under autocast. `kdistill-unfused` sets",
        "`train.fused: false` (torch's default Adam). Each is kdistill with every other setting",
        "unchanged; `kdistill` is the default, float32 with the fused Adam.",
        "",
        *NOTES,
        "## Raw output",
        "",
        "```",
        *raw_lines(measured),
        "```",
        "",
    ]
    return "\n".join(page)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke check: {QUICK_TRAIN_LIMIT} training images, 1 epoch; writes a page only "
        "where --readme names one",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each student phase and logits pass per round; the fastest counts",
    )
    parser.add_argument(
        "--cli-runs", type=int, default=1, help="timed `kdistill run` invocations (default 1)"
    )
    parser.add_argument("--readme", type=Path, default=None, help=f"page to write ({README})")
    parser.add_argument("--worker", choices=["matmul", "reference", *VARIANTS], help="internal")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick and args.worker is None:
        args.rounds = min(args.rounds, 1)
    return args


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        worker(args)
        return
    measured = collect(args)
    summary = summarize(measured, args)
    page = render_page(measured, summary, args)
    print(page)
    # A quick run is a smoke check, so it writes the page only where --readme names one.
    readme = args.readme
    if readme is None and not args.quick:
        readme = README
    if readme is not None:
        readme.write_text(page, encoding="utf-8")
        print(f"wrote {readme}", file=sys.stderr)


if __name__ == "__main__":
    main()
