"""Export of the student: files, ONNX and torch.export parity, determinism and atomic writes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import kdistill
from kdistill import artifacts, checkpoint, cli
from kdistill.config import Config, ModelConfig
from kdistill.data import load_splits
from kdistill.export import ExportError, export_student
from kdistill.models import Classifier, build_model, model_spec

ALL_FORMATS = ["safetensors", "onnx", "pt2"]
EXPORT_NAMES = {"student.safetensors", "model.json", "student.onnx", "student.pt2"}
SOURCE_FOLDER = str(Path(kdistill.__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def splits():
    return load_splits(Config().data, seed=0)


def make_student(splits, seed: int = 0, **options) -> Classifier:
    """Build an untrained student on digits; parity does not depend on training."""
    torch.manual_seed(seed)
    spec = model_spec(ModelConfig(hidden=[16], **options), splits.num_features, splits.num_classes)
    return build_model(spec, splits.mean, splits.std).eval()


def export(model, folder, splits, formats=ALL_FORMATS, config=None) -> dict:
    return export_student(model, folder, formats, splits.class_names, splits.x_test, config)


@pytest.fixture(scope="module")
def exported(splits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    model = make_student(splits)
    manifest = export(model, folder, splits)
    return model, folder, manifest


# step: files and their contents


def test_export_writes_every_file(exported):
    _, folder, manifest = exported
    names = {path.name for path in folder.iterdir()}
    assert names == EXPORT_NAMES | {"manifest.json"}
    assert set(manifest["files"]) == EXPORT_NAMES
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == artifacts.sha256_file(folder / name), name
        assert entry["bytes"] == (folder / name).stat().st_size, name
    assert artifacts.read_json(folder / "manifest.json") == manifest


def test_model_json_describes_student(exported, splits):
    model, folder, _ = exported
    description = artifacts.read_json(folder / "model.json")
    assert description["spec"] == model.spec
    assert description["num_classes"] == 10
    assert description["class_names"] == splits.class_names
    assert description["input_shape"] == [64]
    assert description["normalization"]["kind"] == "standardize"
    assert np.allclose(description["normalization"]["mean"], splits.mean.numpy())
    assert np.allclose(description["normalization"]["std"], splits.std.numpy())
    assert description["kdistill_version"] == kdistill.__version__
    assert description["torch_version"] == torch.__version__


def test_onnx_graph_opset_batch_axis(exported):
    _, folder, _ = exported
    proto = onnx.load(str(folder / "student.onnx"))
    onnx.checker.check_model(proto)
    opset = next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))
    assert opset >= 17
    (graph_input,) = proto.graph.input
    batch, features = graph_input.type.tensor_type.shape.dim
    assert batch.dim_param == "batch"
    assert features.dim_value == 64
    assert proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # The standardization is part of the graph, so raw inputs go in.
    operators = [node.op_type for node in proto.graph.node]
    assert operators[:2] == ["Sub", "Div"]


@pytest.mark.parametrize("batch_size", [1, 5, 33])
def test_onnx_takes_raw_inputs(exported, splits, batch_size):
    model, folder, _ = exported
    session = onnxruntime.InferenceSession(
        str(folder / "student.onnx"), providers=["CPUExecutionProvider"]
    )
    x = splits.x_test[:batch_size]
    (logits,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert logits.shape == (batch_size, 10)
    assert np.abs(logits - expected).max() <= 1e-5


@pytest.mark.parametrize("batch_size", [1, 5, 33])
def test_pt2_takes_raw_inputs(exported, splits, batch_size):
    model, folder, _ = exported
    program = torch.export.load(folder / "student.pt2").module()
    x = splits.x_test[:batch_size]
    with torch.no_grad():
        logits = program(x)
        expected = model(x)
    assert logits.shape == (batch_size, 10)
    assert (logits - expected).abs().max().item() <= 1e-5


def test_manifest_records_parity(exported, splits):
    _, _, manifest = exported
    parity = manifest["parity"]
    rows = len(splits.y_test)
    assert parity["rows"] == rows
    assert parity["tolerance"] == 1e-5
    assert parity["batch_sizes"] == [1, 7, rows]
    assert set(parity["max_abs_diff"]) == {"safetensors", "onnx", "pt2"}
    for runtime, checks in parity["max_abs_diff"].items():
        assert [c["batch_size"] for c in checks] == [1, 7, rows], runtime
        for check in checks:
            assert 0.0 <= check["max_abs_diff"] <= 1e-5, (runtime, check)


def test_files_contain_no_local_paths(exported):
    _, folder, _ = exported
    for name in ("student.onnx", "student.pt2"):
        content = (folder / name).read_bytes()
        assert SOURCE_FOLDER.encode() not in content, name
        assert str(folder).encode() not in content, name


def test_safetensors_contains_student_only(exported):
    model, folder, _ = exported
    weights = load_file(str(folder / "student.safetensors"))
    assert set(weights) == set(model.state_dict())
    assert not any(key.startswith(("module.", "_orig_mod.", "teacher")) for key in weights)
    reloaded = kdistill.load(folder)
    for key, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key


# step: determinism


def test_export_is_byte_identical(exported, splits, tmp_path):
    model, folder, _ = exported
    export(model, tmp_path, splits)
    for name in sorted(EXPORT_NAMES | {"manifest.json"}):
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name


def write_run_folder(folder: Path, model: Classifier, splits) -> Config:
    """Lay out what ``kdistill export`` reads from a finished run: config.yaml and student/."""
    config = Config()
    folder.mkdir(parents=True, exist_ok=True)
    artifacts.write_text(folder / "config.yaml", config.to_yaml())
    checkpoint.save_model(folder / "student", model, splits.class_names, config.to_dict())
    return config


def test_cli_export_matches_library(splits, tmp_path):
    model = make_student(splits, seed=3)
    config = write_run_folder(tmp_path / "run", model, splits)
    reference = tmp_path / "reference"
    export(model, reference, splits, config=config.to_dict())

    completed = subprocess.run(
        [sys.executable, "-m", "kdistill.cli", "export", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "parity on 360 test rows" in completed.stdout
    # A second process gives the same bytes as this one.
    for name in sorted(EXPORT_NAMES | {"manifest.json"}):
        produced = (tmp_path / "run" / "export" / name).read_bytes()
        assert produced == (reference / name).read_bytes(), name


def test_cli_export_missing_run_is_clean_error(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "nothing")]) == 2
    stderr = capsys.readouterr().err
    assert "kdistill: error:" in stderr
    assert "config.yaml" in stderr
    assert "Traceback" not in stderr


def test_cli_export_unknown_format_is_clean_error(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path), "--formats", "onnx,torchscript"]) == 2
    stderr = capsys.readouterr().err
    assert "unknown export format(s) ['torchscript']" in stderr


# step: training flags and parity failures


def test_export_restores_training_flags(splits, tmp_path):
    model = make_student(splits, batch_norm=True, dropout=0.3)
    model.train()
    with torch.no_grad():
        model(splits.x_train[:64])  # moves batch norm's running statistics off their defaults
    model.net[1].eval()  # mixed flags must come back exactly, not as one model-wide flag
    flags = {name: module.training for name, module in model.named_modules()}

    manifest = export(model, tmp_path, splits)

    assert {name: module.training for name, module in model.named_modules()} == flags
    for checks in manifest["parity"]["max_abs_diff"].values():
        assert max(c["max_abs_diff"] for c in checks) <= 1e-5


class AlwaysDropout(Classifier):
    """A student whose forward ignores eval mode, so its exports cannot match it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(super().forward(x), p=0.5, training=True)


def test_parity_failure_writes_nothing(splits, tmp_path):
    torch.manual_seed(0)
    spec = model_spec(ModelConfig(hidden=[16]), splits.num_features, splits.num_classes)
    model = AlwaysDropout(spec).eval()
    folder = tmp_path / "export"

    with pytest.raises(ExportError) as caught:
        export(model, folder, splits, formats=["onnx"])

    message = str(caught.value)
    assert "student.onnx" in message
    assert "max absolute difference" in message
    figure = float(re.search(r"by up to ([0-9.e+-]+)", message).group(1))
    assert figure > 1e-5
    assert not folder.exists() or not any(folder.iterdir())


def test_unknown_format_rejected(exported, splits, tmp_path):
    model, _, _ = exported
    with pytest.raises(ExportError, match="torchscript"):
        export(model, tmp_path, splits, formats=["onnx", "torchscript"])


def test_export_removes_unrequested_formats(exported, splits, tmp_path):
    model, folder, _ = exported
    for path in folder.iterdir():
        shutil.copy(path, tmp_path / path.name)
    manifest = export(model, tmp_path, splits, formats=["safetensors"])
    assert set(manifest["files"]) == {"student.safetensors", "model.json"}
    assert not (tmp_path / "student.onnx").exists()
    assert not (tmp_path / "student.pt2").exists()


# step: nothing half-written


def test_failed_write_leaves_no_partial_file(splits, tmp_path, monkeypatch):
    first = make_student(splits, seed=1)
    export(first, tmp_path, splits)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    real_write_bytes = Path.write_bytes

    def write_half_then_fail(self: Path, data: bytes) -> int:
        # The disk fills up half-way through the ONNX file.
        if self.name.startswith(".student.onnx."):
            real_write_bytes(self, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_half_then_fail)
    second = make_student(splits, seed=2)
    with pytest.raises(OSError, match="No space left"):
        export(second, tmp_path, splits)
    monkeypatch.undo()

    after = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert set(after) == set(before), "a temporary file was left behind"
    # Files that the failed export never reached are intact from the first export.
    for name in ("student.onnx", "student.pt2", "manifest.json"):
        assert after[name] == before[name], name
    # Files written before the failure are complete: they load and give the second model.
    reloaded = kdistill.load(tmp_path)
    for key, tensor in second.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key


def test_empty_formats_write_nothing(exported, splits, tmp_path):
    model, _, _ = exported
    assert export(model, tmp_path / "export", splits, formats=[]) == {}
    assert not (tmp_path / "export").exists()


def test_tolerance_scales_with_large_logits(splits, tmp_path):
    model = make_student(splits)
    with torch.no_grad():
        model.net[-1].weight.mul_(1000.0)  # logits in the thousands
    manifest = export(model, tmp_path / "export", splits, formats=["onnx"])
    parity = manifest["parity"]
    assert parity["max_abs_logit"] > 100
    assert parity["effective_tolerance"] == pytest.approx(1e-5 * parity["max_abs_logit"])
    worst = max(c["max_abs_diff"] for c in parity["max_abs_diff"]["onnx"])
    assert worst <= parity["effective_tolerance"]
