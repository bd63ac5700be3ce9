"""Class predictions from an exported student on new data in CSV, NPZ or IDX files.

The model runs in one of three runtimes, picked by file type: ONNX Runtime for ``.onnx``,
``torch.export.load`` for ``.pt2`` and ``kdistill.load`` for ``.safetensors``. Class names,
the input width and the training label column come from the ``model.json`` beside the file.
"""

from __future__ import annotations

import csv
import io
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NoReturn

import numpy as np
import torch

from kdistill import artifacts, checkpoint
from kdistill.data import DataError, find_non_finite, read_idx
from kdistill.export import DESCRIPTION_NAME, EXPORT_FILES, MANIFEST_FORMAT, MANIFEST_NAME

log = logging.getLogger(__name__)

Logits = Callable[[np.ndarray], np.ndarray]

# For an export folder: ONNX and safetensors load without unpickling anything, and .pt2 comes
# last because torch.export.load can unpickle parts of the archive.
FOLDER_PREFERENCE = ("onnx", "safetensors", "pt2")
RUNTIME_BY_SUFFIX = {".onnx": "onnx", ".pt2": "pt2", ".safetensors": "safetensors"}


class PredictError(ValueError):
    """A model or input file that predict cannot use, with the reason and the expected shape."""


@dataclass
class Predictor:
    """A loaded model with what is needed to read inputs for it and label its outputs."""

    path: Path
    runtime: str
    num_features: int
    class_names: list[str]
    label_column: str | None
    logits: Logits
    feature_names: list[str] | None = None


# step: runtimes


def onnx_logits(source: bytes | Path, threads: int = 0) -> Logits:
    """Open an ONNX model in ONNX Runtime on the CPU; ``threads=0`` lets it choose."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    model = source if isinstance(source, bytes) else str(source)
    try:
        session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's error types do not share a base class
        raise PredictError(
            f"{source if isinstance(source, Path) else 'ONNX model'}: "
            f"ONNX Runtime failed to load it ({error})"
        ) from None
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return run


def pt2_logits(source: Path | BinaryIO) -> Logits:
    """Load a ``torch.export`` program and return a function that computes its logits.

    NOTE: torch.export.load (torch 2.13) retries torch.load with weights_only=False when a
    weights-only load fails and unpickles pickled constants, so a crafted .pt2 file can run
    code when loaded. Only load .pt2 files you trust.
    """
    try:
        module = torch.export.load(source).module()
    except (RuntimeError, ValueError, KeyError, OSError, zipfile.BadZipFile) as error:
        raise PredictError(f"{source}: torch.export.load failed ({error})") from None

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run


def safetensors_logits(path: Path) -> Logits:
    """Rebuild the model with ``kdistill.load`` and return a function that computes logits."""
    model = checkpoint.load(path)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return run


# step: choosing and opening the model


def open_model(path: str | Path) -> Predictor:
    """Open an export folder or one of its model files, after checking it against the manifest."""
    path = Path(path)
    model_file = _choose_file(path)
    runtime = RUNTIME_BY_SUFFIX[model_file.suffix]
    folder = model_file.parent
    _verify_against_manifest(folder, [model_file, folder / DESCRIPTION_NAME])
    description = checkpoint.read_description(folder / DESCRIPTION_NAME)
    config = description.get("config") or {}
    if runtime == "onnx":
        logits = onnx_logits(model_file)
    elif runtime == "pt2":
        logits = pt2_logits(model_file)
    else:
        logits = safetensors_logits(model_file)
    log.info("loaded %s with %s", model_file, runtime)
    return Predictor(
        path=model_file,
        runtime=runtime,
        num_features=int(description["spec"]["in_features"]),
        class_names=[str(name) for name in description["class_names"]],
        label_column=(config.get("data") or {}).get("label"),
        logits=logits,
        feature_names=description["spec"].get("feature_names"),
    )


def _choose_file(path: Path) -> Path:
    if path.is_dir():
        for runtime in FOLDER_PREFERENCE:
            candidate = path / EXPORT_FILES[runtime]
            if candidate.is_file():
                return candidate
        # A model folder saved by a run (model.safetensors) is also accepted.
        if (path / "model.safetensors").is_file():
            return path / "model.safetensors"
        names = ", ".join(EXPORT_FILES[r] for r in FOLDER_PREFERENCE)
        raise PredictError(f"{path}: no model file in this folder; expected one of {names}")
    if path.name == DESCRIPTION_NAME:
        return _choose_file(path.parent)
    if not path.exists():
        raise PredictError(f"{path}: model not found")
    if path.suffix not in RUNTIME_BY_SUFFIX:
        raise PredictError(
            f"{path}: unsupported model file; pass an export folder or its .onnx, .pt2 or "
            ".safetensors file (pickle-based .pt/.pth/.bin files are never loaded)"
        )
    return path


def _verify_against_manifest(folder: Path, files: list[Path]) -> None:
    """Compare sha256 sums with the export manifest, when the folder has one."""
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        log.debug("%s: no %s, file hashes not checked", folder, MANIFEST_NAME)
        return
    manifest = artifacts.read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        log.debug("%s: not an export manifest, file hashes not checked", manifest_path)
        return
    listed = manifest.get("files", {})
    for path in files:
        if not path.is_file():
            continue  # the loader reports the missing file with its own message
        entry = listed.get(path.name)
        if entry is None:
            raise PredictError(
                f"{path}: not listed in {manifest_path}; the export is incomplete or mixed "
                "with another one. Run kdistill export again"
            )
        if artifacts.sha256_file(path) != entry["sha256"]:
            raise PredictError(
                f"{path}: sha256 differs from {manifest_path}; the file was changed or only "
                "partly replaced. Run kdistill export again"
            )


# step: reading inputs


def read_input(
    path: str | Path,
    num_features: int,
    label_column: str | None = None,
    feature_names: list[str] | None = None,
) -> np.ndarray:
    """Read raw feature rows as float32 of shape (rows, num_features).

    CSV files need a header row. With ``feature_names`` (a model trained on CSV data), columns
    are taken by name in training order. Otherwise they are taken by position, and a column
    named ``label_column`` is dropped. NPZ files
    need an array ``x``. IDX files are scaled by 1/255, as training does for IDX images.
    """
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"{path}: input file not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        x = _read_csv(path, num_features, label_column, feature_names)
    elif suffix == ".npz":
        x = _read_npz(path)
    else:
        x = _read_idx(path)
    _check_shape(x, num_features, path)
    _check_finite(x, path)
    return x


def _expected(num_features: int) -> str:
    return f"the model expects shape (rows, {num_features}): {num_features} numbers per row"


def _read_csv(
    path: Path, num_features: int, label_column: str | None, feature_names: list[str] | None
) -> np.ndarray:
    # utf-8-sig drops the byte order mark that spreadsheet programs put before the header.
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        raise PredictError(f"{path}: failed to read as UTF-8 CSV text ({error})") from None
    if not rows:
        raise PredictError(f"{path}: empty file; expected a header row and data rows")
    header, body = rows[0], rows[1:]
    if all(_is_number(name) for name in header):
        raise PredictError(
            f"{path}: the first line {header[:4]}... is all numbers, so the header row is "
            "missing; add a header line with one name per column"
        )
    keep = [i for i, name in enumerate(header) if name != label_column]
    if feature_names is not None:
        missing = [name for name in feature_names if name not in header]
        if missing:
            missing_text = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            trained_text = ", ".join(feature_names[:5])
            if len(feature_names) > 5:
                trained_text += ", ..."
            raise PredictError(
                f"{path}: missing column(s) {missing_text}; the model was trained on the CSV "
                f"columns {trained_text}"
            )
        keep = [header.index(name) for name in feature_names]
    if len(keep) != num_features:
        dropped = (
            f" after dropping the label column '{label_column}'" if len(keep) < len(header) else ""
        )
        raise PredictError(
            f"{path}: {len(keep)} feature columns{dropped}; {_expected(num_features)}"
        )
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise PredictError(
                f"{path}, line {line}: {len(row)} fields but the header has {len(header)}"
            )
    try:
        values = np.array([[row[i] for i in keep] for row in body], dtype=np.float64)
    except ValueError:
        _raise_first_non_number(path, header, body, keep, num_features)
    return values.reshape(len(body), num_features).astype(np.float32)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _raise_first_non_number(
    path: Path, header: list[str], body: list[list[str]], keep: list[int], num_features: int
) -> NoReturn:
    # Only runs after numpy rejected the block, to name the offending cell.
    for line, row in enumerate(body, start=2):
        for column in keep:
            try:
                float(row[column])
            except ValueError:
                raise PredictError(
                    f"{path}, line {line}, column '{header[column]}': {row[column]!r} is not a "
                    f"number; {_expected(num_features)}"
                ) from None
    raise PredictError(f"{path}: failed to parse the values as numbers; {_expected(num_features)}")


def _read_npz(path: Path) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise PredictError(f"{path}: failed to read as .npz ({error})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise PredictError(
            f"{path}: a single .npy array, not an .npz archive; save the features with "
            "numpy.savez(path, x=features)"
        )
    with loaded as archive:
        if "x" not in archive.files:
            raise PredictError(
                f"{path}: no array 'x' (found {archive.files}); save the features as 'x'"
            )
        try:
            x = archive["x"]
        except ValueError as error:  # object arrays need pickle, which stays disabled
            raise PredictError(f"{path}: failed to read array 'x' ({error})") from None
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise PredictError(f"{path}: x has dtype {x.dtype}; expected real numbers")
    return _flatten_rows(x).astype(np.float32)


def _flatten_rows(array: np.ndarray) -> np.ndarray:
    """Reshape (rows, d1, d2, ...) to (rows, d1 * d2 * ...); return 0-D and 1-D arrays as is."""
    if array.ndim < 2:
        return array
    return array.reshape(len(array), int(np.prod(array.shape[1:])))


def _read_idx(path: Path) -> np.ndarray:
    try:
        array = read_idx(path)
    except DataError as error:
        raise PredictError(f"{error}; inputs must be .csv, .npz or IDX files") from None
    # Training divides IDX images by 255 whatever their element type, so predict does too.
    return _flatten_rows(array).astype(np.float32) / 255.0


def _check_shape(x: np.ndarray, num_features: int, path: Path) -> None:
    if x.ndim < 2 or x.shape[1] != num_features:
        raise PredictError(f"{path}: input has shape {x.shape}; {_expected(num_features)}")
    if len(x) == 0:
        raise PredictError(f"{path}: no rows to predict; {_expected(num_features)}")


def _check_finite(x: np.ndarray, path: Path) -> None:
    found = find_non_finite(x)
    if found is not None:
        count, row, column = found
        raise PredictError(
            f"{path}: {count} NaN or infinite value(s), first at row {row}, "
            f"column {column} (both counted from 0, header excluded); the model needs finite "
            "numbers"
        )


# step: predicting and writing


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def format_predictions(probabilities: np.ndarray, class_names: list[str]) -> str:
    """Render CSV rows ``id,class,class_name,prob_0..prob_{C-1}``; ids count rows from 0."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    classes = probabilities.shape[1]
    writer.writerow(["id", "class", "class_name", *(f"prob_{c}" for c in range(classes))])
    for row_id, row in enumerate(probabilities):
        predicted = int(row.argmax())
        name = class_names[predicted] if predicted < len(class_names) else str(predicted)
        writer.writerow([row_id, predicted, name, *(f"{p:.6g}" for p in row)])
    return buffer.getvalue()


def predict_file(
    model_path: str | Path, input_path: str | Path, output: str | Path | None = None
) -> str:
    """Predict a class for every row of ``input_path``; return the CSV text.

    The text is also written atomically to ``output`` when one is given.
    """
    if output is not None:
        _check_output(Path(output), Path(input_path))
    predictor = open_model(model_path)
    x = read_input(
        input_path, predictor.num_features, predictor.label_column, predictor.feature_names
    )
    logits = predictor.logits(x)
    text = format_predictions(softmax(logits), predictor.class_names)
    if output is not None:
        artifacts.write_text(output, text)
        log.info("wrote %d predictions to %s", len(x), output)
    return text


def _check_output(output: Path, input_path: Path) -> None:
    if output.is_dir():
        raise PredictError(f"--output {output} is a folder; give a file name such as out.csv")
    if output.exists() and input_path.exists() and output.resolve() == input_path.resolve():
        raise PredictError(
            f"--output {output} is the input file; writing there would destroy the input"
        )
