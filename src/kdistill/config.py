"""Typed configuration: schema, defaults, YAML loading, dotted overrides and validation.

Every field carries its meaning and unit in the ``metadata["doc"]`` of its dataclass field,
and ``describe()`` lists them all.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DATA_NAMES = ("digits", "fashion-mnist", "mnist", "csv", "npz")
ACTIVATIONS = ("relu", "gelu", "tanh", "silu")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")
EXPORT_FORMATS = ("safetensors", "onnx", "pt2")
DEVICES = ("cpu", "cuda", "auto")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class ConfigError(ValueError):
    """Invalid configuration: every problem found, one per line, each naming its key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def _doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class DataConfig:
    """Data source and split settings."""

    name: str = _doc(f"dataset: one of {', '.join(DATA_NAMES)}", "digits")
    path: str | None = _doc(
        "folder of IDX files (mnist, fashion-mnist) or the .csv/.npz file; "
        f"fashion-mnist defaults to {FASHION_MNIST_DIR}",
        None,
    )
    label: str = _doc("csv only: name of the label column", "label")
    val_fraction: float = _doc("fraction of the training data held out for validation", 0.2)
    test_fraction: float = _doc(
        "fraction held out for testing when the data has no test split of its own", 0.2
    )
    train_limit: int = _doc(
        "use at most this many training examples, stratified (0 = all); for quick trials", 0
    )


@dataclass
class ModelConfig:
    """A multilayer perceptron: input -> hidden layers -> class logits."""

    hidden: list[int] = _doc("widths of the hidden layers, in units", factory=lambda: [256, 256])
    activation: str = _doc(f"nonlinearity: one of {', '.join(ACTIVATIONS)}", "relu")
    dropout: float = _doc("dropout probability after each hidden layer, in [0, 1)", 0.0)
    input_dropout: float = _doc("dropout probability on the input features, in [0, 1)", 0.0)
    batch_norm: bool = _doc("batch normalization after each hidden linear layer", False)


def _default_teacher() -> ModelConfig:
    return ModelConfig(hidden=[512, 512], dropout=0.3, input_dropout=0.1)


def _default_student() -> ModelConfig:
    return ModelConfig(hidden=[16])


@dataclass
class TrainConfig:
    """Optimization settings, shared by the teacher and both students unless overridden."""

    epochs: int = _doc("passes over the training split for each student", 60)
    teacher_epochs: int | None = _doc("passes for the teacher (null = same as epochs)", 60)
    batch_size: int = _doc("examples per optimizer step", 64)
    optimizer: str = _doc(f"one of {', '.join(OPTIMIZERS)}", "adam")
    lr: float = _doc("peak learning rate for the students", 3e-3)
    teacher_lr: float | None = _doc("peak learning rate for the teacher (null = lr)", None)
    momentum: float = _doc("SGD momentum (ignored by adam and adamw), in [0, 1)", 0.9)
    weight_decay: float = _doc("L2 penalty (adam, sgd) or decoupled decay (adamw)", 0.0)
    schedule: str = _doc(f"learning-rate schedule: one of {', '.join(SCHEDULES)}", "onecycle")
    keep_best: bool = _doc(
        "keep the weights of the epoch with the best validation accuracy, not the last", True
    )
    fused: bool = _doc("use the fused optimizer kernel where torch has one", True)
    bf16: bool = _doc(
        "bfloat16 autocast for the training forward passes; evaluation stays float32. Off by "
        "default: benchmarks/README.md shows its speed and accuracy",
        False,
    )
    teacher_bf16: bool | None = _doc(
        "bfloat16 autocast for the teacher's training and for its logits on the training "
        "split, the soft targets; its validation and test logits stay float32 (null = bf16)",
        None,
    )


@dataclass
class DistillConfig:
    """Distillation settings: the soft-target temperature and its weight."""

    temperature: float = _doc("softmax temperature T for the soft targets, > 0", 2.0)
    alpha: float = _doc(
        "weight of the soft-target loss in [0, 1]; the hard-label loss gets 1 - alpha", 0.5
    )


@dataclass
class EvalConfig:
    """Evaluation settings: paired seeds, calibration bins and the interval level."""

    seeds: int = _doc("paired seeds: each trains one baseline and one distilled student", 5)
    ece_bins: int = _doc("equal-width confidence bins for the expected calibration error", 15)
    confidence: float = _doc("level of the interval on the mean paired difference", 0.95)


@dataclass
class ExportConfig:
    """Formats written to export/ at the end of a run."""

    formats: list[str] = _doc(
        f"any of {', '.join(EXPORT_FORMATS)}", factory=lambda: list(EXPORT_FORMATS)
    )


@dataclass
class RunConfig:
    """Seeding, hardware and output location."""

    seed: int = _doc("drives the split and the teacher; the paired seeds derive from it", 0)
    device: str = _doc(f"one of {', '.join(DEVICES)}", "cpu")
    threads: int = _doc("CPU threads for torch (0 = every core this process may use)", 0)
    out: str = _doc("folder under which a new run directory is created", "runs")


@dataclass
class Config:
    """The whole resolved configuration of one run."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=_default_teacher)
    student: ModelConfig = field(default_factory=_default_student)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def teacher_epochs(self) -> int:
        return self.train.teacher_epochs or self.train.epochs

    @property
    def teacher_lr(self) -> float:
        return self.train.teacher_lr if self.train.teacher_lr is not None else self.train.lr

    @property
    def teacher_bf16(self) -> bool:
        teacher = self.train.teacher_bf16
        return teacher if teacher is not None else self.train.bf16

    def threads(self) -> int:
        if self.run.threads > 0:
            return self.run.threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# step: reading raw mappings into dataclasses, collecting problems instead of stopping at one


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(annotation: Any) -> str:
    names = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_name(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(parts) + " or null"
    if origin is list:
        (item,) = typing.get_args(annotation)
        return f"a list of {_type_name(item).removeprefix('a ').removeprefix('an ')}s"
    return names.get(annotation, str(annotation))


def _coerce(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Return (ok, value) with ints widened to floats where a float is expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return True, None
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _coerce(value, inner[0])
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            return False, value
        coerced = [_coerce(v, item) for v in value]
        return all(ok for ok, _ in coerced), [v for _, v in coerced]
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            # YAML 1.1 reads 1e-3 (no dot) as a string; it is a number to every reader.
            value = float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
        return ok, float(value) if ok else value
    if annotation is str:
        return isinstance(value, str), value
    return False, value


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"


def _build_section(default: Any, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Return ``default`` with the keys of ``raw`` applied; unset keys keep its values.

    The teacher and student sections share one type but not their defaults, so a section
    starts from the Config's default for it, not from the type's field defaults.
    """
    cls = type(default)
    section = copy.deepcopy(default)
    if raw is None:
        return section
    if not isinstance(raw, dict):
        problems.append(f"{prefix}: expected a mapping of keys to values, got {raw!r}")
        return section
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    for key, value in raw.items():
        if key not in hints:
            problems.append(f"{prefix}.{key}: unknown key{_suggest(str(key), valid)}")
            continue
        ok, coerced = _coerce(value, hints[key])
        if not ok:
            expected = _type_name(hints[key])
            problems.append(f"{prefix}.{key}: expected {expected}, got {value!r}")
            continue
        setattr(section, key, coerced)
    return section


def from_dict(raw: Any) -> Config:
    """Build and validate a Config from a mapping; raise ConfigError listing every problem."""
    problems: list[str] = []
    config = Config()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"top level: expected a mapping of sections, got {raw!r}"])
    hints = typing.get_type_hints(Config)
    sections = [f.name for f in dataclasses.fields(Config)]
    for key, value in raw.items():
        if key not in hints:
            problems.append(f"{key}: unknown section{_suggest(str(key), sections)}")
            continue
        setattr(config, key, _build_section(getattr(config, key), value, key, problems))
    # Fields with a wrong type kept their defaults, so value checks still run on the rest.
    problems.extend(validate(config))
    if problems:
        raise ConfigError(problems)
    return config


# step: value checks that types alone cannot express


def _check_choice(problems: list[str], key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(value, choices, n=1)
        tail = f"; did you mean '{hint[0]}'?" if hint else ""
        problems.append(f"{key}: '{value}' is not one of {', '.join(choices)}{tail}")


def _check_range(problems: list[str], key: str, ok: bool, value: Any, expected: str) -> None:
    if not ok:
        problems.append(f"{key}: {value!r} is invalid; expected {expected}")


def _validate_model(problems: list[str], name: str, model: ModelConfig) -> None:
    _check_range(
        problems,
        f"{name}.hidden",
        len(model.hidden) > 0,
        model.hidden,
        "at least one hidden width, e.g. [128]",
    )
    for width in model.hidden:
        _check_range(problems, f"{name}.hidden", width >= 1, width, "widths >= 1")
    _check_choice(problems, f"{name}.activation", model.activation, ACTIVATIONS)
    for key in ("dropout", "input_dropout"):
        value = getattr(model, key)
        _check_range(problems, f"{name}.{key}", 0.0 <= value < 1.0, value, "a value in [0, 1)")


def _validate_data(problems: list[str], data: DataConfig) -> None:
    _check_choice(problems, "data.name", data.name, DATA_NAMES)
    if data.name in ("csv", "npz", "mnist") and not data.path:
        problems.append(f"data.path: required for data.name={data.name}; set data.path=FILE")
    _check_range(
        problems,
        "data.val_fraction",
        0.0 < data.val_fraction < 1.0,
        data.val_fraction,
        "a fraction in (0, 1)",
    )
    _check_range(
        problems,
        "data.test_fraction",
        0.0 < data.test_fraction < 1.0,
        data.test_fraction,
        "a fraction in (0, 1)",
    )
    _check_range(
        problems,
        "data.train_limit",
        data.train_limit >= 0,
        data.train_limit,
        "0 (all) or a positive count",
    )


def _validate_train(problems: list[str], train: TrainConfig) -> None:
    _check_range(problems, "train.epochs", train.epochs >= 1, train.epochs, "an integer >= 1")
    if train.teacher_epochs is not None:
        _check_range(
            problems,
            "train.teacher_epochs",
            train.teacher_epochs >= 1,
            train.teacher_epochs,
            "an integer >= 1 or null",
        )
    _check_range(
        problems, "train.batch_size", train.batch_size >= 1, train.batch_size, "an integer >= 1"
    )
    _check_choice(problems, "train.optimizer", train.optimizer, OPTIMIZERS)
    _check_choice(problems, "train.schedule", train.schedule, SCHEDULES)
    _check_range(problems, "train.lr", train.lr > 0, train.lr, "a learning rate > 0")
    if train.teacher_lr is not None:
        _check_range(
            problems,
            "train.teacher_lr",
            train.teacher_lr > 0,
            train.teacher_lr,
            "a learning rate > 0 or null",
        )
    _check_range(
        problems, "train.momentum", 0.0 <= train.momentum < 1.0, train.momentum, "a value in [0, 1)"
    )
    _check_range(
        problems, "train.weight_decay", train.weight_decay >= 0, train.weight_decay, "a value >= 0"
    )


def validate(config: Config) -> list[str]:
    """Return every value problem of a type-correct config; empty when it is valid."""
    problems: list[str] = []
    run = config.run
    _validate_data(problems, config.data)
    _validate_model(problems, "teacher", config.teacher)
    _validate_model(problems, "student", config.student)
    _validate_train(problems, config.train)
    temperature, alpha = config.distill.temperature, config.distill.alpha
    _check_range(problems, "distill.temperature", temperature > 0, temperature, "a value > 0")
    _check_range(problems, "distill.alpha", 0.0 <= alpha <= 1.0, alpha, "a value in [0, 1]")
    _check_range(
        problems,
        "eval.seeds",
        config.eval.seeds >= 1,
        config.eval.seeds,
        "an integer >= 1 (2 or more for a confidence interval)",
    )
    _check_range(
        problems,
        "eval.ece_bins",
        config.eval.ece_bins >= 1,
        config.eval.ece_bins,
        "an integer >= 1",
    )
    _check_range(
        problems,
        "eval.confidence",
        0.0 < config.eval.confidence < 1.0,
        config.eval.confidence,
        "a level in (0, 1), e.g. 0.95",
    )
    for fmt in config.export.formats:
        _check_choice(problems, "export.formats", fmt, EXPORT_FORMATS)
    _check_range(problems, "run.seed", run.seed >= 0, run.seed, "an integer >= 0")
    _check_choice(problems, "run.device", run.device, DEVICES)
    _check_range(
        problems, "run.threads", run.threads >= 0, run.threads, "0 (all cores) or a positive count"
    )
    return problems


# step: files and overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into its key path and a YAML-parsed value."""
    key, sep, value = text.partition("=")
    if not sep or not key or "." not in key:
        raise ConfigError([f"override '{text}': expected SECTION.KEY=VALUE, e.g. train.epochs=5"])
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError([f"override '{text}': value is not valid YAML ({error})"]) from None
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b=value`` override set."""
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    problems: list[str] = []
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ConfigError as error:
            problems.extend(error.problems)
            continue
        if len(path) != 2:
            problems.append(
                f"override '{text}': expected exactly SECTION.KEY, got {len(path)} parts"
            )
            continue
        section, key = path
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            problems.append(f"override '{text}': section '{section}' is not a mapping")
            continue
        target[key] = value
    if problems:
        raise ConfigError(problems)
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file with the safe loader, which runs no code from YAML tags."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text; save the config as UTF-8 YAML"]) from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError([f"{path}: not valid YAML{line}: {problem}"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping of sections, got {type(raw).__name__}"])
    return raw


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a config file (or the built-in default), apply overrides and validate."""
    raw = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(raw, overrides or []))


def describe() -> list[tuple[str, str, str]]:
    """List (key, default, meaning) for every field, for help text and docs."""
    rows = []
    defaults = Config()
    for section in dataclasses.fields(Config):
        for item in dataclasses.fields(getattr(defaults, section.name)):
            value = getattr(getattr(defaults, section.name), item.name)
            rows.append((f"{section.name}.{item.name}", repr(value), item.metadata["doc"]))
    return rows
