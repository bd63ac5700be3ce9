"""The whole pipeline: data, teacher, paired baseline and distilled students, metrics, report.

Each model is a stage that writes its weights, history and ``done.json`` into its own folder.
A resumed run loads finished stages from disk and retrains the rest. Every stage seeds its own
random state, so a resumed run ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kdistill import artifacts, checkpoint
from kdistill.config import Config, from_dict, read_yaml
from kdistill.data import Splits, load_splits
from kdistill.metrics import accuracy, classification_metrics
from kdistill.models import Classifier, build_model, count_params, model_spec
from kdistill.teachers import freeze, split_logits
from kdistill.trainer import Hyper, SoftTargets, TrainData, predict_logits, train

log = logging.getLogger(__name__)


class RunError(ValueError):
    """A run that cannot start or continue, with the reason and the fix."""


@dataclass
class Run:
    """Shared state of one pipeline run: config, folder, data and the live log."""

    config: Config
    folder: Path
    splits: Splits | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def log_epoch(self, record: dict[str, Any]) -> None:
        log.info(format_record(record))
        with open(self.folder / "log.jsonl", "a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")


def format_record(record: dict[str, Any]) -> str:
    """Render one epoch record as a readable line."""
    kd = "-" if record["kd_loss"] is None else f"{record['kd_loss']:.4f}"
    temperature = "-" if record["temperature"] is None else f"{record['temperature']:g}"
    agreement = record.get("teacher_agreement")
    agree = "" if agreement is None else f" agree {agreement:.4f}"
    return (
        f"{record['model']:<8} seed {record['seed']:<3} epoch {record['epoch']:>3}  "
        f"loss {record['loss']:.4f} ce {record['ce_loss']:.4f} kd {kd}  "
        f"val_acc {record['val_accuracy']:.4f}{agree}  T {temperature}  "
        f"lr {record['lr']:.2e}  {record['seconds']:.2f}s"
    )


def eval_seeds(config: Config) -> list[int]:
    """Derive the paired seeds from ``run.seed``; the teacher and split use ``run.seed`` itself."""
    return [config.run.seed * 1000 + 1 + i for i in range(config.eval.seeds)]


def hyper_for(config: Config, teacher: bool) -> Hyper:
    train_config = config.train
    return Hyper(
        epochs=config.teacher_epochs if teacher else train_config.epochs,
        lr=config.teacher_lr if teacher else train_config.lr,
        batch_size=train_config.batch_size,
        optimizer=train_config.optimizer,
        momentum=train_config.momentum,
        weight_decay=train_config.weight_decay,
        schedule=train_config.schedule,
        keep_best=train_config.keep_best,
        fused=train_config.fused,
        bf16=config.teacher_bf16 if teacher else train_config.bf16,
    )


# step: the run folder


def prepare_folder(config: Config, folder: Path, resume: bool) -> None:
    """Create the run folder, or check that a resumed one was made by the same config."""
    saved = folder / "config.yaml"
    if folder.exists() and not folder.is_dir():
        raise RunError(f"--out {folder} is a file, not a folder; choose a folder for the run")
    if folder.exists() and any(folder.iterdir()):
        if not resume:
            raise RunError(
                f"run folder {folder} already exists and is not empty; pass --resume to "
                "continue it, or choose another --out"
            )
        if not saved.is_file():
            raise RunError(f"{folder} has no config.yaml, so it is not a kdistill run to resume")
        previous = from_dict(read_yaml(saved)).to_dict()
        requested = config.to_dict()
        changed = [
            f"{section}.{key}" for section, values in requested.items()
            for key, value in values.items() if previous[section][key] != value
        ]  # fmt: skip
        if changed:
            raise RunError(
                f"{saved} differs from the requested config in {', '.join(changed)}; resume "
                f"with the same config (give {saved} as CONFIG to reuse it) or choose another --out"
            )
        log.info("resuming %s", folder)
    folder.mkdir(parents=True, exist_ok=True)
    artifacts.write_text(saved, config.to_yaml())
    # The live log restarts; finished stages replay their saved history into it at the end.
    (folder / "log.jsonl").unlink(missing_ok=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("run.device=cuda but torch sees no CUDA device; set run.device=cpu")
    return torch.device(name)


# step: stages


def _stage_done(folder: Path) -> bool:
    marker = folder / "done.json"
    if not marker.is_file():
        return False
    recorded = artifacts.read_json(marker).get("sha256", {})
    return all(
        (folder / name).is_file() and artifacts.sha256_file(folder / name) == digest
        for name, digest in recorded.items()
    )


def _finish_stage(folder: Path, model: Classifier, run: Run, result_info: dict) -> None:
    names = run.splits.class_names
    checkpoint.save_model(folder, model, names, run.config.to_dict())
    history = "".join(json.dumps(r) + "\n" for r in result_info["history"])
    artifacts.write_text(folder / "history.jsonl", history)
    files = ["model.safetensors", "model.json", "history.jsonl"]
    digests = {name: artifacts.sha256_file(folder / name) for name in files}
    artifacts.write_json(
        folder / "done.json", {"best_epoch": result_info["best_epoch"], "sha256": digests}
    )


def _load_stage(folder: Path, model: Classifier) -> list[dict]:
    checkpoint.load_weights(model, folder / "model.safetensors")
    lines = (folder / "history.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line]


def train_stage(
    run: Run,
    folder: Path,
    model: Classifier,
    hyper: Hyper,
    seed: int,
    name: str,
    soft: SoftTargets | None = None,
    val_reference: torch.Tensor | None = None,
) -> list[dict]:
    """Train ``model`` unless ``folder`` contains a finished copy; return its epoch history."""
    if _stage_done(folder):
        log.info("%s: finished earlier, loading %s", name, folder)
        return _load_stage(folder, model)
    splits = run.splits
    data = TrainData(splits.x_train, splits.y_train, splits.x_val, splits.y_val, val_reference)
    result = train(model, data, hyper, seed, name, soft, run.log_epoch)
    _finish_stage(folder, model, run, {"history": result.history, "best_epoch": result.best_epoch})
    return result.history


def teacher_stage(run: Run, teacher_path: str | None) -> tuple[Classifier, dict]:
    """Train the teacher (or load a given one) and return it frozen, with its logits."""
    config, splits = run.config, run.splits
    folder = run.folder / "teacher"
    if teacher_path is not None:
        teacher = load_teacher(teacher_path, splits, config).to(run.device)
        history: list[dict] = []
    else:
        torch.manual_seed(config.run.seed)
        spec = model_spec(
            config.teacher, splits.num_features, splits.num_classes, splits.feature_names
        )
        teacher = build_model(spec, splits.mean, splits.std).to(run.device)
        history = train_stage(
            run, folder, teacher, hyper_for(config, True), config.run.seed, "teacher"
        )
    freeze(teacher)
    cached = _cached_logits(folder, teacher, splits, config.teacher_bf16)
    logits = {k: v.to(run.device) for k, v in cached.items()}
    return teacher, {"history": history, "logits": logits}


def _check_teacher_split(path: Path, config: Config | None) -> None:
    """Reject a teacher trained on another split, whose training data may be our test split."""
    if config is None:
        return
    trained = checkpoint.read_description(
        path / "model.json" if path.is_dir() else path.parent / "model.json"
    ).get("config")
    if not trained:
        log.warning("teacher %s records no config, so its split cannot be checked", path)
        return
    current = config.to_dict()
    differences = [
        f"data.{key}" for key in current["data"]
        if trained.get("data", {}).get(key) != current["data"][key]
    ]  # fmt: skip
    if trained.get("run", {}).get("seed") != current["run"]["seed"]:
        differences.append("run.seed")
    if differences:
        raise RunError(
            f"teacher {path} was trained with other {', '.join(differences)}, so its training "
            "data may overlap this run's validation or test split; use the same data and "
            "run.seed settings as the teacher's run"
        )


def load_teacher(path: str | Path, splits: Splits, config: Config | None = None) -> Classifier:
    """Load a saved teacher and check it fits the data's feature and class counts."""
    path = Path(path)
    if path.is_dir() and (path / "teacher").is_dir() and not (path / "model.json").is_file():
        path = path / "teacher"
    teacher = checkpoint.load(path)
    spec = teacher.spec
    if spec["in_features"] != splits.num_features:
        raise RunError(
            f"teacher {path} takes {spec['in_features']} features but the data has "
            f"{splits.num_features}; distill on the data the teacher was trained on"
        )
    if spec["num_classes"] != splits.num_classes:
        raise RunError(
            f"teacher {path} predicts {spec['num_classes']} classes but the data has "
            f"{splits.num_classes}; teacher and student class counts must agree"
        )
    _check_teacher_split(path, config)
    return teacher


def _weights_digest(model: Classifier) -> str:
    digest = hashlib.sha256()
    for key, tensor in checkpoint.clean_state_dict(model).items():
        digest.update(key.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _read_logits_cache(cache: Path, key: str, splits: Splits) -> dict[str, torch.Tensor] | None:
    """Return the cached logits if ``cache`` contains them for ``key`` and these splits, else None.

    The file is only a cache, so a damaged one is recomputed rather than reported.
    """
    if not cache.is_file():
        return None
    try:
        with safe_open(str(cache), framework="pt") as stored:
            recorded = (stored.metadata() or {}).get("kdistill_logits")
        logits = load_file(str(cache))
    except (SafetensorError, OSError) as error:
        log.warning(
            "teacher logits cache %s is unreadable (%s); computing them again", cache, error
        )
        return None
    sizes_match = all(k in logits and logits[k].shape[0] == n for k, n in splits.sizes().items())
    return logits if recorded == key and sizes_match else None


def _cached_logits(
    folder: Path, teacher: Classifier, splits: Splits, bf16_train: bool
) -> dict[str, torch.Tensor]:
    """Return the teacher's logits from the cache, or compute and cache them.

    The cache records the digest of the teacher's weights and the precision of the training
    split's logits, so a different teacher or precision in the same folder never reuses
    stale logits.
    """
    cache = folder / "logits.safetensors"
    # One metadata key: safetensors writes several in no fixed order, which would make the
    # file's bytes, and the run manifest, differ between identical runs.
    key = json.dumps(
        {
            "teacher_sha256": _weights_digest(teacher),
            "train_precision": "bf16" if bf16_train else "fp32",
        },
        sort_keys=True,
    )
    metadata = {"kdistill_logits": key}
    cached = _read_logits_cache(cache, key, splits)
    if cached is not None:
        return cached
    logits = split_logits(teacher, splits, bf16_train)
    on_cpu = {k: v.cpu().contiguous() for k, v in logits.items()}
    artifacts.atomic_write(cache, lambda tmp: save_file(on_cpu, str(tmp), metadata=metadata))
    return logits


def student_pair(run: Run, teacher_logits: dict, seed: int) -> dict[str, Any]:
    """Train the baseline and the distilled student of one seed from the same initial weights."""
    config, splits = run.config, run.splits
    spec = model_spec(config.student, splits.num_features, splits.num_classes, splits.feature_names)
    torch.manual_seed(seed)
    initial = build_model(spec, splits.mean, splits.std).to(run.device)
    hyper = hyper_for(config, False)
    reference = teacher_logits["val"].argmax(dim=1)
    soft = SoftTargets(teacher_logits["train"], config.distill.temperature, config.distill.alpha)
    outcome: dict[str, Any] = {"seed": seed}
    for name, targets in (("baseline", None), ("student", soft)):
        model = copy.deepcopy(initial)
        folder = run.folder / name / f"seed-{seed}"
        history = train_stage(run, folder, model, hyper, seed, name, targets, reference)
        logits = predict_logits(model, splits.x_test)
        metrics = classification_metrics(
            logits, splits.y_test, config.eval.ece_bins, teacher_logits["test"]
        )
        metrics["val_accuracy"] = accuracy(predict_logits(model, splits.x_val), splits.y_val)
        outcome[name] = {"model": model, "metrics": metrics, "history": history}
    return outcome


# step: the whole run


def _setup(config: Config, folder: Path, resume: bool) -> Run:
    torch.set_num_threads(config.threads())
    run = Run(config, Path(folder), device=resolve_device(config.run.device))
    run.splits = load_splits(config.data, config.run.seed)  # bad data fails before any write
    _to_device(run.splits, run.device)
    prepare_folder(config, run.folder, resume)
    sizes = run.splits.sizes()
    log.info(
        "data %s: %d train, %d val, %d test, %d features, %d classes; %d threads",
        run.splits.source, sizes["train"], sizes["val"], sizes["test"],
        run.splits.num_features, run.splits.num_classes, torch.get_num_threads(),
    )  # fmt: skip
    _warn_slow_bf16(config, run.device)
    return run


def _warn_slow_bf16(config: Config, device: torch.device) -> None:
    """Warn when bfloat16 autocast is requested on a CPU without bfloat16 instructions.

    Without them oneDNN emulates bfloat16 matrix multiplies, and users on the PyTorch forum
    have reported those far slower than float32.
    """
    if device.type != "cpu" or not (config.train.bf16 or config.teacher_bf16):
        return
    if cpu_has_bf16() is False:
        log.warning(
            "train.bf16 or train.teacher_bf16 is on, but this CPU has no bfloat16 "
            "instructions, so autocast may be slower than float32; set both to false"
        )


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Return whether the CPU flags list bfloat16 instructions, or None where unknown.

    x86 lists avx512_bf16 or amx_bf16, and 64-bit Arm lists bf16. torch's own check
    (``mkldnn_bf16_device_check`` in ATen) passes any x86 CPU with AVX512BW, VL and DQ,
    including those without bfloat16 instructions, so it cannot tell the two apart.
    """
    try:
        with open(cpuinfo, encoding="utf-8") as stream:
            text = stream.read()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _to_device(splits: Splits, device: torch.device) -> None:
    """Move the example tensors to ``device``; mean and std stay on the CPU until copied."""
    # NOTE: only the CPU path is tested here; on CUDA, results are deterministic only as far
    # as the GPU kernels are.
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        setattr(splits, name, getattr(splits, name).to(device))


def train_teacher_only(config: Config, folder: Path, resume: bool = False) -> Path:
    """Train and save a teacher into ``folder/teacher``; return that folder."""
    run = _setup(config, folder, resume)
    teacher, _ = teacher_stage(run, None)
    metrics = classification_metrics(
        predict_logits(teacher, run.splits.x_test), run.splits.y_test, config.eval.ece_bins
    )
    artifacts.write_json(run.folder / "teacher" / "metrics.json", metrics)
    from kdistill.results import write_manifest

    splits = run.splits
    data = {"source": splits.source, "fingerprint": splits.fingerprint, **splits.sizes()}
    write_manifest(run.folder, config.run.seed, data)
    return run.folder / "teacher"


def run_pipeline(
    config: Config, folder: Path, resume: bool = False, teacher_path: str | None = None
) -> dict[str, Any]:
    """Run teacher, paired students, evaluation, report and export; return metrics.json."""
    started = time.perf_counter()
    run = _setup(config, folder, resume)
    splits = run.splits

    # teacher
    teacher, teacher_info = teacher_stage(run, teacher_path)
    logits = teacher_info["logits"]
    teacher_metrics = classification_metrics(logits["test"], splits.y_test, config.eval.ece_bins)
    teacher_metrics["val_accuracy"] = accuracy(logits["val"], splits.y_val)
    if teacher_path is None:
        artifacts.write_json(run.folder / "teacher" / "metrics.json", teacher_metrics)

    # paired students
    outcomes = [student_pair(run, logits, seed) for seed in eval_seeds(config)]
    for name in ("baseline", "student"):
        rows = [{"seed": o["seed"], **o[name]["metrics"]} for o in outcomes]
        artifacts.write_json(run.folder / name / "metrics.json", {"per_seed": rows})

    # evaluation
    from kdistill.results import build_metrics, write_manifest

    context = {
        "data": {
            "source": splits.source,
            "fingerprint": splits.fingerprint,
            **splits.sizes(),
            "features": splits.num_features,
            "classes": splits.num_classes,
        },
        "distill": {
            "temperature": config.distill.temperature,
            "alpha": config.distill.alpha,
            "soft_target_precision": "bf16" if config.teacher_bf16 else "fp32",
        },
        "seeds": eval_seeds(config),
        "teacher_source": str(teacher_path) if teacher_path else "trained",
    }
    params = {
        "teacher": count_params(teacher),
        "student": count_params(outcomes[0]["student"]["model"]),
    }
    metrics = build_metrics(
        teacher_metrics,
        [{"seed": o["seed"], **o["baseline"]["metrics"]} for o in outcomes],
        [{"seed": o["seed"], **o["student"]["metrics"]} for o in outcomes],
        params,
        config.eval.confidence,
        context,
    )
    artifacts.write_json(run.folder / "metrics.json", metrics)

    # save the chosen student, the log, the report and the exports
    chosen = next(o for o in outcomes if o["seed"] == metrics["exported_seed"])
    student = chosen["student"]["model"]
    checkpoint.save_model(run.folder / "student", student, splits.class_names, config.to_dict())
    histories = teacher_info["history"] + [
        record
        for o in outcomes
        for name in ("baseline", "student")
        for record in o[name]["history"]
    ]
    artifacts.write_text(run.folder / "log.jsonl", "".join(json.dumps(r) + "\n" for r in histories))
    _write_report(run, metrics, histories)
    _export(run, student)
    write_manifest(run.folder, config.run.seed, context["data"])
    log.info("run finished in %.1f s: %s", time.perf_counter() - started, run.folder)
    return metrics


def _write_report(run: Run, metrics: dict, histories: list[dict]) -> None:
    from kdistill.report import write_report

    write_report(run.folder, metrics, histories, run.config)


def _export(run: Run, student: Classifier) -> None:
    from kdistill.export import export_student

    export_student(
        student,
        run.folder / "export",
        run.config.export.formats,
        run.splits.class_names,
        run.splits.x_test,
        run.config.to_dict(),
    )
