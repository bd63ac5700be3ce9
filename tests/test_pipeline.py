"""The pipeline as a library: pairing, alpha = 0, determinism, resume and teacher checks."""

import json

import pytest
import torch
from conftest import small_config

from kdistill import artifacts, checkpoint, trainer
from kdistill.pipeline import RunError, run_pipeline, train_teacher_only
from kdistill.teachers import freeze


def student_file(folder, model, seed):
    return folder / model / f"seed-{seed}" / "model.safetensors"


def test_alpha_zero_matches_baseline_bit_for_bit(tmp_path):
    metrics = run_pipeline(small_config("distill.alpha=0.0"), tmp_path / "run")
    for seed in metrics["seeds"]:
        baseline = student_file(tmp_path / "run", "baseline", seed).read_bytes()
        student = student_file(tmp_path / "run", "student", seed).read_bytes()
        assert baseline == student
    assert metrics["comparison"]["differences"] == [0.0, 0.0]


def test_distilled_differs_from_baseline(tmp_path):
    metrics = run_pipeline(small_config("distill.alpha=0.9"), tmp_path / "run")
    seed = metrics["seeds"][0]
    baseline = student_file(tmp_path / "run", "baseline", seed).read_bytes()
    student = student_file(tmp_path / "run", "student", seed).read_bytes()
    assert baseline != student


def test_same_seed_same_bytes(tmp_path):
    cfg = small_config()
    run_pipeline(cfg, tmp_path / "a")
    run_pipeline(cfg, tmp_path / "b")
    for name in (
        "student/model.safetensors",
        "teacher/model.safetensors",
        "metrics.json",
        "export/student.safetensors",
    ):
        first = artifacts.sha256_file(tmp_path / "a" / name)
        second = artifacts.sha256_file(tmp_path / "b" / name)
        assert first == second, name


def test_other_seed_other_weights(tmp_path):
    run_pipeline(small_config("run.seed=0"), tmp_path / "a")
    run_pipeline(small_config("run.seed=1"), tmp_path / "b")
    first = artifacts.sha256_file(tmp_path / "a" / "teacher" / "model.safetensors")
    second = artifacts.sha256_file(tmp_path / "b" / "teacher" / "model.safetensors")
    assert first != second


def test_resume_after_interrupt_matches_uninterrupted(tmp_path, monkeypatch):
    cfg = small_config()
    run_pipeline(cfg, tmp_path / "whole")

    real_train = trainer.train
    calls = {"count": 0}

    def interrupt_third_model(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr("kdistill.pipeline.train", interrupt_third_model)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    monkeypatch.setattr("kdistill.pipeline.train", real_train)

    with pytest.raises(RunError, match="--resume"):
        run_pipeline(cfg, tmp_path / "resumed")
    run_pipeline(cfg, tmp_path / "resumed", resume=True)
    for name in ("student/model.safetensors", "metrics.json", "export/student.safetensors"):
        first = artifacts.sha256_file(tmp_path / "whole" / name)
        second = artifacts.sha256_file(tmp_path / "resumed" / name)
        assert first == second, name
    whole_log = (tmp_path / "whole" / "log.jsonl").read_text().splitlines()
    resumed_log = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert len(whole_log) == len(resumed_log)


def test_resume_rejects_other_config(tmp_path):
    run_pipeline(small_config(), tmp_path / "run")
    with pytest.raises(RunError, match="differs from the requested config in distill.temperature;"):
        run_pipeline(small_config("distill.temperature=8"), tmp_path / "run", resume=True)


def test_metrics_schema(tmp_path):
    metrics = run_pipeline(small_config(), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for name in ("teacher", "baseline", "student"):
        model = saved["models"][name]
        assert 0.0 <= model["accuracy"] <= 1.0
        assert model["params"] > 0
    for name in ("baseline", "student"):
        assert len(saved["models"][name]["per_seed"]) == 2
        assert "accuracy_std" in saved["models"][name]
    comparison = saved["comparison"]
    assert comparison["low"] <= comparison["mean"] <= comparison["high"]
    assert "verdict" in comparison


def test_teacher_is_frozen_after_run(tmp_path):
    folder = train_teacher_only(small_config(), tmp_path / "run")
    teacher = freeze(checkpoint.load(folder))
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())


def test_distill_from_saved_teacher(tmp_path):
    folder = train_teacher_only(small_config(), tmp_path / "teacher-run")
    metrics = run_pipeline(small_config(), tmp_path / "run", teacher_path=str(folder))
    assert metrics["teacher_source"] == str(folder)
    whole = run_pipeline(small_config(), tmp_path / "whole")
    assert metrics["models"]["student"]["accuracy"] == whole["models"]["student"]["accuracy"]


def test_teacher_class_count_mismatch(tmp_path):
    import numpy as np

    folder = train_teacher_only(small_config(), tmp_path / "teacher-run")
    x = np.random.default_rng(0).normal(size=(120, 64)).astype(np.float32)
    np.savez(tmp_path / "three.npz", x=x, y=np.arange(120) % 3)
    cfg = small_config("data.name=npz", f"data.path={tmp_path / 'three.npz'}")
    with pytest.raises(RunError, match="predicts 10 classes but the data has 3"):
        run_pipeline(cfg, tmp_path / "run", teacher_path=str(folder))


def test_teacher_logits_cached_once(tmp_path, monkeypatch):
    calls = {"count": 0}
    from kdistill import pipeline

    real = pipeline.split_logits

    def counting(*args, **kwargs):
        calls["count"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "split_logits", counting)
    run_pipeline(small_config(), tmp_path / "run")
    assert calls["count"] == 1
    cached = tmp_path / "run" / "teacher" / "logits.safetensors"
    assert cached.is_file()


def test_bad_data_writes_nothing(tmp_path):
    import numpy as np

    x = np.zeros((60, 4), dtype=np.float32)
    x[3, 1] = np.nan
    np.savez(tmp_path / "bad.npz", x=x, y=np.arange(60) % 3)
    cfg = small_config("data.name=npz", f"data.path={tmp_path / 'bad.npz'}")
    from kdistill.data import DataError

    with pytest.raises(DataError):
        run_pipeline(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_predict_logits_restores_training_flag():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5))
    model.train()
    trainer.predict_logits(model, torch.zeros(4, 3))
    assert model.training


def test_teacher_from_other_split_rejected(tmp_path):
    folder = train_teacher_only(small_config("run.seed=0"), tmp_path / "teacher-run")
    with pytest.raises(RunError, match="run.seed"):
        run_pipeline(small_config("run.seed=1"), tmp_path / "run", teacher_path=str(folder))


def test_divergence_stops_before_saving(tmp_path):
    from kdistill.trainer import DivergenceError

    cfg = small_config("train.optimizer=sgd", "train.lr=1e30", "train.schedule=constant")
    with pytest.raises(DivergenceError, match="lower train.lr"):
        run_pipeline(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "teacher" / "done.json").exists()


def test_one_seed_gives_json_null_bounds(tmp_path):
    run_pipeline(small_config("eval.seeds=1"), tmp_path / "run")
    text = (tmp_path / "run" / "metrics.json").read_text()
    assert "Infinity" not in text
    saved = json.loads(text)
    assert saved["comparison"]["low"] is None
    assert saved["models"]["student"]["accuracy_std"] is None


def untrained_teacher():
    """Return (frozen untrained teacher, digits splits) from the small test config."""
    from kdistill.data import load_splits
    from kdistill.models import build_model, model_spec

    cfg = small_config()
    splits = load_splits(cfg.data, cfg.run.seed)
    torch.manual_seed(0)
    spec = model_spec(cfg.teacher, splits.num_features, splits.num_classes)
    return freeze(build_model(spec, splits.mean, splits.std)), splits


def test_logits_cache_keyed_by_precision(tmp_path):
    from safetensors import safe_open

    from kdistill import pipeline

    teacher, splits = untrained_teacher()

    exact = pipeline._cached_logits(tmp_path, teacher, splits, bf16_train=False)
    rounded = pipeline._cached_logits(tmp_path, teacher, splits, bf16_train=True)
    with safe_open(str(tmp_path / "logits.safetensors"), framework="pt") as stored:
        assert json.loads(stored.metadata()["kdistill_logits"])["train_precision"] == "bf16"
    assert not torch.equal(exact["train"], rounded["train"])
    torch.testing.assert_close(rounded["train"], exact["train"], rtol=0.02, atol=0.05)
    # Validation and test logits measure the teacher, so they stay float32.
    assert torch.equal(exact["test"], rounded["test"])
    assert torch.equal(exact["val"], rounded["val"])
    again = pipeline._cached_logits(tmp_path, teacher, splits, bf16_train=True)
    assert torch.equal(again["train"], rounded["train"])


def test_bf16_without_cpu_support_warns(monkeypatch, caplog):
    from kdistill import config as config_module
    from kdistill import pipeline

    monkeypatch.setattr(pipeline, "cpu_has_bf16", lambda: False)
    cfg = config_module.from_dict({"train": {"teacher_bf16": True}})
    with caplog.at_level("WARNING", logger="kdistill.pipeline"):
        pipeline._warn_slow_bf16(cfg, torch.device("cpu"))
    assert "no bfloat16 instructions" in caplog.text

    caplog.clear()
    with caplog.at_level("WARNING", logger="kdistill.pipeline"):
        pipeline._warn_slow_bf16(config_module.Config(), torch.device("cpu"))
    assert caplog.text == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512bw avx512_bf16\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512bw avx512vl\n", False),
        ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n", True),
        ("processor\t: 0\nFeatures\t: fp asimd\n", False),
        ("processor\t: 0\n", None),
    ],
)
def test_cpu_bf16_flags(tmp_path, text, expected):
    from kdistill.pipeline import cpu_has_bf16

    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert cpu_has_bf16(str(path)) is expected
    assert cpu_has_bf16(str(tmp_path / "missing")) is None


def test_damaged_logits_cache_is_recomputed(tmp_path):
    from kdistill import pipeline

    teacher, splits = untrained_teacher()
    first = pipeline._cached_logits(tmp_path, teacher, splits, bf16_train=False)
    cache = tmp_path / "logits.safetensors"
    written = cache.read_bytes()
    cache.write_bytes(b"garbage")

    again = pipeline._cached_logits(tmp_path, teacher, splits, bf16_train=False)
    assert torch.equal(again["train"], first["train"])
    # The rewritten cache has the same bytes: one metadata key, so no ordering to vary.
    assert cache.read_bytes() == written


def test_metrics_record_soft_target_precision(tmp_path):
    metrics = run_pipeline(small_config("train.teacher_bf16=true"), tmp_path / "run")
    assert metrics["distill"]["soft_target_precision"] == "bf16"
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["distill"]["soft_target_precision"] == "bf16"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "soft targets computed in bfloat16" in report
