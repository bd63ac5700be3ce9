"""The command line end to end, run as a subprocess on the real digits data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kdistill

FAST = [
    "teacher.hidden=[128]", "train.epochs=8", "train.teacher_epochs=8", "eval.seeds=2",
    "export.formats=[safetensors]",
]  # fmt: skip


def kdistill_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kdistill.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    result = kdistill_cli("run", *FAST, "--out", str(folder / "run"), cwd=folder)
    return folder / "run", result


def test_run_exits_zero(finished_run):
    _, result = finished_run
    assert result.returncode == 0, result.stderr


def test_run_folder_complete(finished_run):
    folder, _ = finished_run
    for name in (
        "config.yaml",
        "manifest.json",
        "metrics.json",
        "log.jsonl",
        "report.md",
        "report.html",
        "plots/val_accuracy.png",
        "plots/loss.png",
        "teacher/model.safetensors",
        "teacher/model.json",
        "teacher/metrics.json",
        "baseline/metrics.json",
        "student/model.safetensors",
        "student/model.json",
        "export/student.safetensors",
        "export/model.json",
    ):
        assert (folder / name).is_file(), name
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["files"]["student/model.safetensors"]["sha256"]
    assert manifest["data"]["fingerprint"]
    assert manifest["versions"]["torch"]


def test_student_learns_above_chance(finished_run):
    folder, _ = finished_run
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["models"]["student"]["accuracy"] > 0.6
    assert metrics["models"]["teacher"]["accuracy"] > 0.8


def test_run_prints_table_and_verdict(finished_run):
    _, result = finished_run
    for word in ("teacher", "baseline", "student", "verdict:", "paired seeds"):
        assert word in result.stdout
    assert "CI [" in result.stdout


def test_log_has_one_record_per_epoch(finished_run):
    folder, result = finished_run
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert len(records) == 8 + 2 * 2 * 8
    for key in (
        "model",
        "seed",
        "epoch",
        "loss",
        "ce_loss",
        "kd_loss",
        "val_accuracy",
        "seconds",
        "lr",
        "temperature",
        "samples_per_s",
        "teacher_agreement",
    ):
        assert key in records[0], key
    students = [r for r in records if r["model"] == "student"]
    assert all(r["kd_loss"] is not None for r in students)
    assert "epoch   8" in result.stderr
    # Piped output gets no progress bar.
    assert "step/s" not in result.stderr


def test_resolved_config_saved(finished_run):
    folder, _ = finished_run
    saved = kdistill.config.load(folder / "config.yaml")
    assert saved.train.epochs == 8
    assert saved.teacher.hidden == [128]


def test_saved_student_round_trip(finished_run):
    folder, _ = finished_run
    from kdistill.data import load_splits
    from kdistill.trainer import predict_logits

    cfg = kdistill.config.load(folder / "config.yaml")
    splits = load_splits(cfg.data, cfg.run.seed)
    model = kdistill.load(folder / "student")
    metrics = json.loads((folder / "metrics.json").read_text())
    chosen = [
        r for r in metrics["models"]["student"]["per_seed"] if r["seed"] == metrics["exported_seed"]
    ][0]
    logits = predict_logits(model, splits.x_test)
    accuracy = float((logits.argmax(1) == splits.y_test).float().mean())
    assert accuracy == chosen["accuracy"]
    # Raw inputs go in: the model standardizes them itself.
    assert model.standardize.mean.abs().sum() > 0


def test_bad_config_reports_all_problems(tmp_path):
    result = kdistill_cli(
        "run",
        "distill.temperature=0",
        "distill.alpha=2",
        "train.epochs=0",
        "studnet.hidden=[4]",
        "--out",
        str(tmp_path / "run"),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for text in ("distill.temperature", "distill.alpha", "did you mean 'student'"):
        assert text in result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_data_fails_before_training(tmp_path):
    x = np.zeros((60, 4), dtype=np.float32)
    y = np.arange(60) % 3
    y[10] = 7
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    result = kdistill_cli(
        "run",
        "data.name=npz",
        f"data.path={tmp_path / 'bad.npz'}",
        "--out",
        str(tmp_path / "run"),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "bad.npz" in result.stderr
    assert "no training example" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_existing_folder_needs_resume(finished_run, tmp_path):
    folder, _ = finished_run
    result = kdistill_cli("run", *FAST, "--out", str(folder), cwd=tmp_path)
    assert result.returncode == 2
    assert "--resume" in result.stderr


def test_resume_of_finished_run_keeps_bytes(finished_run, tmp_path):
    folder, _ = finished_run
    before = (folder / "student" / "model.safetensors").read_bytes()
    result = kdistill_cli("run", "--resume", "--out", str(folder), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "finished earlier" in result.stderr
    assert (folder / "student" / "model.safetensors").read_bytes() == before


def test_train_teacher_then_distill(tmp_path):
    config_path = tmp_path / "small.yaml"
    config_path.write_text(
        "teacher: {hidden: [64]}\ntrain: {epochs: 3, teacher_epochs: 3}\n"
        "eval: {seeds: 2}\nexport: {formats: [safetensors]}\n"
    )
    first = kdistill_cli(
        "train-teacher", str(config_path), "--out", str(tmp_path / "t"), cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "t" / "teacher" / "model.safetensors").is_file()
    assert (tmp_path / "t" / "manifest.json").is_file()
    second = kdistill_cli(
        "distill",
        str(config_path),
        "--teacher",
        str(tmp_path / "t"),
        "--out",
        str(tmp_path / "d"),
        cwd=tmp_path,
    )
    assert second.returncode == 0, second.stderr
    assert "verdict:" in second.stdout


def test_export_refreshes_run_manifest(finished_run, tmp_path):
    folder, _ = finished_run
    result = kdistill_cli("export", str(folder), "--formats", "safetensors,onnx", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "parity" in result.stdout
    manifest = json.loads((folder / "manifest.json").read_text())
    onnx_entry = manifest["files"]["export/student.onnx"]
    assert onnx_entry["sha256"] == kdistill.artifacts.sha256_file(folder / "export/student.onnx")


def test_resume_without_out_rejected(tmp_path):
    result = kdistill_cli("run", "--resume", cwd=tmp_path)
    assert result.returncode == 2
    assert "--resume needs --out" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_out_pointing_at_file_rejected(tmp_path):
    (tmp_path / "taken.txt").write_text("keep me")
    result = kdistill_cli("run", *FAST, "--out", str(tmp_path / "taken.txt"), cwd=tmp_path)
    assert result.returncode == 2
    assert "is a file" in result.stderr
    assert (tmp_path / "taken.txt").read_text() == "keep me"


def test_html_report_states_settings(finished_run):
    folder, _ = finished_run
    page = (folder / "report.html").read_text()
    assert "paired seeds" in page
    assert "Exported student: seed" in page
    assert "data:image/png;base64," in page


def test_export_empty_formats_rejected(finished_run, tmp_path):
    folder, _ = finished_run
    before = sorted(p.name for p in (folder / "export").iterdir())
    result = kdistill_cli("export", str(folder), "--formats", " , ", cwd=tmp_path)
    assert result.returncode == 2
    assert "names no format" in result.stderr
    assert sorted(p.name for p in (folder / "export").iterdir()) == before


@pytest.mark.parametrize(
    "fault",
    [
        # The CPU allocator's wording, as in torch 2.13's libc10.so.
        RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 123456789 bytes."
        ),
        torch.OutOfMemoryError("out of device memory"),
        MemoryError(),
    ],
)
def test_out_of_memory_exits_with_advice(monkeypatch, capsys, fault):
    # Running out of memory on purpose would disturb the machine, so the handler raises it.
    from kdistill import cli

    def exhausted(args):
        raise fault

    monkeypatch.setattr(cli, "cmd_run", exhausted)
    assert cli.main(["run", "--out", "unused"]) == 2
    message = capsys.readouterr().err
    assert "out of memory" in message
    assert "train.batch_size" in message


def test_overrides_after_options_are_applied(monkeypatch):
    from kdistill import cli

    parsed = []
    monkeypatch.setattr(cli, "cmd_distill", lambda args: parsed.append(args) or 0)
    argv = ["distill", "cfg.yaml", "--teacher", "t", "train.epochs=2", "--out", "o", "eval.seeds=2"]
    assert cli.main(argv) == 0
    assert parsed[0].overrides == ["train.epochs=2", "eval.seeds=2"]
    assert parsed[0].teacher == "t"


def test_unknown_option_still_rejected(tmp_path):
    result = kdistill_cli("run", "--out", str(tmp_path / "o"), "--frobnicate", cwd=tmp_path)
    assert result.returncode == 2
    assert "unrecognized arguments: --frobnicate" in result.stderr
