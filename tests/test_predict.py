"""kdistill predict: runtimes, input formats, input errors and the CLI."""

from __future__ import annotations

import csv
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdistill import cli
from kdistill.config import Config, ModelConfig
from kdistill.data import load_splits
from kdistill.export import export_student
from kdistill.models import build_model, model_spec
from kdistill.predict import PredictError, predict_file, read_input

MODEL_CHOICES = ["", "student.onnx", "student.pt2", "student.safetensors"]


@pytest.fixture(scope="module")
def splits():
    return load_splits(Config().data, seed=0)


@pytest.fixture(scope="module")
def exported(splits, tmp_path_factory):
    """An export folder of an untrained digits student, and the model itself."""
    torch.manual_seed(0)
    spec = model_spec(ModelConfig(hidden=[16]), splits.num_features, splits.num_classes)
    model = build_model(spec, splits.mean, splits.std).eval()
    folder = tmp_path_factory.mktemp("export")
    names = [f"digit {c}" for c in range(10)]
    config = Config().to_dict()
    export_student(model, folder, ["safetensors", "onnx", "pt2"], names, splits.x_test, config)
    return model, folder


def write_csv(path: Path, x: np.ndarray, label: np.ndarray | None = None) -> Path:
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        header = [f"pixel{i}" for i in range(x.shape[1])]
        # The label column goes first here, so dropping it must not shift the features.
        writer.writerow((["label"] if label is not None else []) + header)
        for index, row in enumerate(x):
            prefix = [str(int(label[index]))] if label is not None else []
            writer.writerow(prefix + [repr(float(v)) for v in row])
    return path


def write_idx(path: Path, images: np.ndarray) -> Path:
    """Write unsigned-byte images in the IDX layout: magic, big-endian sizes, then pixels."""
    header = bytes([0, 0, 0x08, images.ndim]) + struct.pack(f">{images.ndim}I", *images.shape)
    path.write_bytes(header + images.astype(np.uint8).tobytes())
    return path


def read_output(text: str) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(text.splitlines()))
    return rows[0], rows[1:]


def expected_probabilities(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(x).float()).double(), dim=1).numpy()


# step: runtimes and output


@pytest.mark.parametrize("choice", MODEL_CHOICES)
def test_runtimes_give_model_predictions(exported, splits, tmp_path, choice):
    model, folder = exported
    x = splits.x_test[:25].numpy()
    source = write_csv(tmp_path / "input.csv", x)

    header, rows = read_output(predict_file(folder / choice, source))

    assert header == ["id", "class", "class_name"] + [f"prob_{c}" for c in range(10)]
    expected = expected_probabilities(model, x)
    assert [int(row[0]) for row in rows] == list(range(25))
    assert [int(row[1]) for row in rows] == expected.argmax(axis=1).tolist()
    assert [row[2] for row in rows] == [f"digit {c}" for c in expected.argmax(axis=1)]
    probabilities = np.array([[float(v) for v in row[3:]] for row in rows])
    assert np.abs(probabilities - expected).max() < 1e-5
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_output_file_matches_stdout_text(exported, splits, tmp_path):
    _, folder = exported
    source = write_csv(tmp_path / "input.csv", splits.x_test[:5].numpy())
    output = tmp_path / "out" / "predictions.csv"
    text = predict_file(folder, source, output)
    assert output.read_text() == text
    assert [p.name for p in output.parent.iterdir()] == ["predictions.csv"]


# step: input formats


def test_csv_label_column_is_ignored(splits, tmp_path):
    x = splits.x_test[:10].numpy()
    labelled = write_csv(tmp_path / "labelled.csv", x, splits.y_test[:10].numpy())
    assert np.array_equal(read_input(labelled, 64, "label"), x)


def test_npz_reads_array_x(splits, tmp_path):
    x = splits.x_test[:10].numpy()
    np.savez(tmp_path / "input.npz", x=x.reshape(10, 8, 8), y=np.zeros(10))
    assert np.array_equal(read_input(tmp_path / "input.npz", 64), x)


def test_idx_images_scaled_like_training(exported, tmp_path):
    model, folder = exported
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 8, 8), dtype=np.uint8)
    source = write_idx(tmp_path / "images-idx3-ubyte", images)

    x = read_input(source, 64)
    assert np.allclose(x, images.reshape(6, 64) / 255.0)
    _, rows = read_output(predict_file(folder, source))
    expected = expected_probabilities(model, images.reshape(6, 64).astype(np.float32) / 255.0)
    assert [int(row[1]) for row in rows] == expected.argmax(axis=1).tolist()


# step: input errors


def test_csv_wrong_width_names_expected_shape(splits, tmp_path):
    source = write_csv(tmp_path / "narrow.csv", splits.x_test[:3, :60].numpy())
    with pytest.raises(PredictError, match=r"60 feature columns.*shape \(rows, 64\)"):
        read_input(source, 64, "label")


def test_npz_wrong_width_names_expected_shape(tmp_path):
    np.savez(tmp_path / "wide.npz", x=np.zeros((4, 65), dtype=np.float32))
    with pytest.raises(PredictError, match=r"shape \(4, 65\).*shape \(rows, 64\)"):
        read_input(tmp_path / "wide.npz", 64)


def test_idx_wrong_width_names_expected_shape(tmp_path):
    source = write_idx(tmp_path / "mnist-idx3-ubyte", np.zeros((2, 28, 28), dtype=np.uint8))
    with pytest.raises(PredictError, match=r"shape \(2, 784\).*shape \(rows, 64\)"):
        read_input(source, 64)


def test_idx_label_file_rejected(tmp_path):
    source = write_idx(tmp_path / "labels-idx1-ubyte", np.zeros(5, dtype=np.uint8))
    with pytest.raises(PredictError, match=r"shape \(5,\).*shape \(rows, 64\)"):
        read_input(source, 64)


def test_csv_non_numeric_value_located(splits, tmp_path):
    source = write_csv(tmp_path / "input.csv", splits.x_test[:3].numpy())
    lines = source.read_text().splitlines()
    cells = lines[2].split(",")
    cells[5] = "seven"
    lines[2] = ",".join(cells)
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(PredictError) as caught:
        read_input(source, 64)
    message = str(caught.value)
    assert "line 3, column 'pixel5'" in message
    assert "'seven' is not a number" in message
    assert "(rows, 64)" in message


def test_nan_value_rejected(tmp_path):
    x = np.zeros((3, 64), dtype=np.float32)
    x[1, 4] = np.nan
    np.savez(tmp_path / "input.npz", x=x)
    with pytest.raises(PredictError, match="row 1, column 4"):
        read_input(tmp_path / "input.npz", 64)


def test_npz_without_x_rejected(tmp_path):
    np.savez(tmp_path / "input.npz", features=np.zeros((3, 64)))
    with pytest.raises(PredictError, match="no array 'x'"):
        read_input(tmp_path / "input.npz", 64)


def test_npy_named_npz_rejected(tmp_path):
    np.save(tmp_path / "input.npy", np.zeros((3, 64)))
    (tmp_path / "input.npy").rename(tmp_path / "input.npz")
    with pytest.raises(PredictError, match="not an .npz archive"):
        read_input(tmp_path / "input.npz", 64)


def test_npz_without_rows_rejected(tmp_path):
    np.savez(tmp_path / "input.npz", x=np.zeros((0, 8, 8)))
    with pytest.raises(PredictError, match="no rows"):
        read_input(tmp_path / "input.npz", 64)


def test_binary_csv_rejected(tmp_path):
    (tmp_path / "input.csv").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(PredictError, match="UTF-8 CSV"):
        read_input(tmp_path / "input.csv", 64)


def test_unknown_input_format_rejected(tmp_path):
    (tmp_path / "input.txt").write_text("1 2 3\n")
    with pytest.raises(PredictError, match=r"\.csv, \.npz or IDX"):
        read_input(tmp_path / "input.txt", 64)


def test_header_only_csv_rejected(tmp_path):
    (tmp_path / "input.csv").write_text(",".join(f"f{i}" for i in range(64)) + "\n")
    with pytest.raises(PredictError, match="no rows"):
        read_input(tmp_path / "input.csv", 64)


# step: model files


def test_changed_model_file_rejected(exported, splits, tmp_path):
    _, folder = exported
    copy = tmp_path / "export"
    shutil.copytree(folder, copy)
    onnx_file = copy / "student.onnx"
    content = bytearray(onnx_file.read_bytes())
    content[-1] ^= 0xFF
    onnx_file.write_bytes(bytes(content))
    source = write_csv(tmp_path / "input.csv", splits.x_test[:2].numpy())
    with pytest.raises(PredictError, match="sha256 differs"):
        predict_file(onnx_file, source)


def test_pickle_model_file_rejected(exported, splits, tmp_path):
    _, folder = exported
    copy = tmp_path / "export"
    shutil.copytree(folder, copy)
    (copy / "student.pt").write_bytes(b"not loaded")
    source = write_csv(tmp_path / "input.csv", splits.x_test[:2].numpy())
    with pytest.raises(PredictError, match="never loaded"):
        predict_file(copy / "student.pt", source)


# step: command line


def test_cli_predict_end_to_end(exported, splits, tmp_path):
    model, folder = exported
    x = splits.x_test[:12].numpy()
    source = write_csv(tmp_path / "input.csv", x, splits.y_test[:12].numpy())
    output = tmp_path / "predictions.csv"

    completed = subprocess.run(
        [sys.executable, "-m", "kdistill.cli", "predict", str(folder), str(source)]
        + ["--output", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == ""
    _, rows = read_output(output.read_text())
    expected = expected_probabilities(model, x)
    assert [int(row[1]) for row in rows] == expected.argmax(axis=1).tolist()


def test_cli_predict_stdout_and_error(exported, splits, tmp_path, capsys):
    _, folder = exported
    source = write_csv(tmp_path / "input.csv", splits.x_test[:3].numpy())
    assert cli.main(["predict", str(folder / "student.pt2"), str(source)]) == 0
    assert capsys.readouterr().out.startswith("id,class,class_name,prob_0,")

    narrow = write_csv(tmp_path / "narrow.csv", splits.x_test[:3, :10].numpy())
    assert cli.main(["predict", str(folder), str(narrow)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "kdistill: error:" in captured.err
    assert "(rows, 64)" in captured.err
    assert "Traceback" not in captured.err


def test_output_equal_to_input_rejected(exported, splits, tmp_path):
    _, folder = exported
    source = tmp_path / "x.npz"
    np.savez(source, x=splits.x_test[:5].numpy())
    before = source.read_bytes()
    with pytest.raises(PredictError, match="is the input file"):
        predict_file(folder, source, source)
    assert source.read_bytes() == before


def test_output_folder_rejected(exported, splits, tmp_path):
    _, folder = exported
    source = write_csv(tmp_path / "input.csv", splits.x_test[:5].numpy())
    with pytest.raises(PredictError, match="is a folder"):
        predict_file(folder, source, tmp_path)


def test_csv_without_header_rejected(splits, tmp_path):
    path = tmp_path / "noheader.csv"
    rows = splits.x_test[:3].numpy()
    path.write_text("\n".join(",".join(str(float(v)) for v in row) for row in rows) + "\n")
    with pytest.raises(PredictError, match="header row is missing"):
        read_input(path, 64)


def test_csv_columns_matched_by_name(splits, tmp_path):
    from conftest import small_config

    from kdistill.pipeline import run_pipeline

    x, y = splits.x_train.numpy(), splits.y_train.numpy()
    train_csv = write_csv(tmp_path / "train.csv", x, y)
    cfg = small_config("data.name=csv", f"data.path={train_csv}",
                       "export.formats=[safetensors, onnx]")  # fmt: skip
    run_pipeline(cfg, tmp_path / "run")
    export = tmp_path / "run" / "export"

    inputs = splits.x_test[:20].numpy()
    in_order = predict_file(export, write_csv(tmp_path / "ordered.csv", inputs))
    reversed_path = tmp_path / "reversed.csv"
    names = [f"pixel{i}" for i in range(64)]
    with reversed_path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(names[::-1])
        for row in inputs:
            writer.writerow([repr(float(v)) for v in row[::-1]])
    assert predict_file(export, reversed_path) == in_order

    missing = tmp_path / "missing.csv"
    missing.write_text(",".join(names[:-1]) + "\n" + ",".join(["0"] * 63) + "\n")
    with pytest.raises(PredictError, match="missing column\\(s\\) pixel63"):
        predict_file(export, missing)
