"""Datasets, validation, stratified splits and standardization statistics.

Everything ends as in-memory float32 feature tensors and int64 label tensors, so the trainer
takes batches by index with no per-example Python work.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from kdistill.config import FASHION_MNIST_DIR, DataConfig

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


class DataError(ValueError):
    """Input data that cannot be used, with the file and the problem named."""


@dataclass
class Splits:
    """Train, validation and test tensors plus what a model needs to know about the inputs."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    class_names: list[str]
    mean: torch.Tensor
    std: torch.Tensor
    source: str
    fingerprint: str
    feature_names: list[str] | None = None

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


# step: readers, one per format, each returning raw numpy arrays


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into an array of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            content = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        # gzip raises EOFError for a truncated archive and BadGzipFile (an OSError) for junk.
        raise DataError(f"{path}: cannot read IDX file, truncated or corrupt ({error})") from None
    if len(content) < 4 or content[0] != 0 or content[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = content[2], content[3]
    if not 1 <= ndim <= 4:
        raise DataError(
            f"{path}: IDX magic number gives {ndim} dimensions; expected 1 (labels) or 3 (images)"
        )
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise DataError(f"{path}: unknown IDX element type 0x{dtype_code:02x}")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", content[4:header])
    dtype = np.dtype(dtypes[dtype_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(content) - header != expected:
        raise DataError(
            f"{path}: IDX header declares shape {shape} ({expected} bytes) but the file contains "
            f"{len(content) - header} bytes; the file is truncated or corrupt"
        )
    return np.frombuffer(content, dtype=dtype, offset=header).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    raise DataError(
        f"{folder}: missing {stem}(.gz); point data.path at the folder with the four IDX files"
    )


def load_idx_folder(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if not folder.is_dir():
        hint = ""
        if str(folder) == FASHION_MNIST_DIR:
            hint = " (install it with: apt-get install dataset-fashion-mnist)"
        raise DataError(f"data.path: folder not found: {folder}{hint}")
    arrays = []
    for stem in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        path = _find_idx(folder, stem)
        array = read_idx(path)
        if "images" in stem:
            array = array.reshape(len(array), -1).astype(np.float32) / 255.0
        arrays.append((path, array))
    (ptr, x_train), (pl, y_train), (pte, x_test), (plt, y_test) = arrays
    _check_rows(ptr, x_train, pl, y_train)
    _check_rows(pte, x_test, plt, y_test)
    return x_train, y_train, x_test, y_test


def _check_rows(x_path: Path, x: np.ndarray, y_path: Path, y: np.ndarray) -> None:
    if len(x) != len(y):
        raise DataError(f"{x_path} has {len(x)} rows but {y_path} has {len(y)} labels")


def load_csv(path: Path, label: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a CSV with a header row: numeric feature columns and one label column."""
    if not path.is_file():
        raise DataError(f"data.path: file not found: {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise DataError(f"{path}: empty file; expected a header row and data rows")
    header, body = rows[0], rows[1:]
    if label not in header:
        raise DataError(
            f"{path}: no label column '{label}' in the header {header[:8]}; "
            "set data.label to the name of the label column"
        )
    if not body:
        raise DataError(f"{path}: no data rows below the header")

    label_index = header.index(label)
    values = np.empty((len(body), len(header)), dtype=np.float64)
    for row_number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"{path}, line {row_number}: {len(row)} fields, expected {len(header)}")
        for column, text in enumerate(row):
            try:
                values[row_number - 2, column] = float(text)
            except ValueError:
                raise DataError(
                    f"{path}, line {row_number}, column '{header[column]}': "
                    f"{text!r} is not a number"
                ) from None

    features = np.delete(values, label_index, axis=1).astype(np.float32)
    names = [name for i, name in enumerate(header) if i != label_index]
    return features, values[:, label_index], names


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read arrays ``x`` (examples first) and ``y`` from an .npz file, without pickle."""
    if not path.is_file():
        raise DataError(f"data.path: file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise DataError(
                    f"{path}: missing array(s) {missing}; found {archive.files}. "
                    "Save the features as 'x' and the labels as 'y'"
                )
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{path}: cannot read as .npz ({error})") from None
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} rows but y has {len(y)} labels")
    if x.ndim < 2:
        raise DataError(f"{path}: x has shape {x.shape}; expected (examples, features...)")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{path}: x has dtype {x.dtype}; expected numbers")
    return x.reshape(len(x), -1).astype(np.float32), y


# step: checks shared by every format


def find_non_finite(x: np.ndarray) -> tuple[int, int, int] | None:
    """Return (count, row, column) of NaN or infinite values, the first one located, or None."""
    bad = ~np.isfinite(x)
    if not bad.any():
        return None
    row, column = np.argwhere(bad)[0]
    return int(bad.sum()), int(row), int(column)


def check_features(x: np.ndarray, source: str) -> None:
    found = find_non_finite(x)
    if found is not None:
        count, row, column = found
        raise DataError(
            f"{source}: {count} NaN or infinite feature value(s), first at row {row}, "
            f"column {column} (both counted from 0, header excluded); clean or impute them "
            "before training"
        )


def check_labels(y: np.ndarray, source: str) -> np.ndarray:
    """Return labels as int64 after checking they are whole numbers >= 0."""
    if y.ndim != 1:
        raise DataError(f"{source}: labels have shape {y.shape}; expected one label per row")
    if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
        raise DataError(f"{source}: labels have dtype {y.dtype}; expected integers 0..C-1")
    as_float = y.astype(np.float64)
    if not np.isfinite(as_float).all() or (as_float != np.round(as_float)).any():
        first = as_float[~np.isfinite(as_float) | (as_float != np.round(as_float))][0]
        raise DataError(
            f"{source}: label {float(first)!r} is not an integer; expected integers 0..C-1"
        )
    if (as_float < 0).any():
        raise DataError(
            f"{source}: label {int(as_float.min())} is negative; expected integers 0..C-1"
        )
    return as_float.astype(np.int64)


def _check_classes(y_train: np.ndarray, num_classes: int, source: str) -> None:
    counts = np.bincount(y_train, minlength=num_classes)
    empty = [c for c in range(num_classes) if counts[c] == 0]
    if empty:
        empty_text = str(empty) if len(empty) <= 10 else f"[{', '.join(map(str, empty[:10]))}, ...]"
        hint = ""
        if empty == [0]:
            hint = " Labels seem to start at 1: subtract 1 so that they run 0..C-1."
        raise DataError(
            f"{source}: class(es) {empty_text} have no training example, but labels go up to "
            f"{num_classes - 1}; labels must be 0..C-1 with every class present in training."
            f"{hint}"
        )


# step: assembling the splits


def _stratified(x, y, fraction: float, seed: int, split_name: str, source: str):
    try:
        return train_test_split(x, y, test_size=fraction, random_state=seed, stratify=y)
    except ValueError as error:
        raise DataError(
            f"{source}: cannot carve a stratified {split_name} split of {fraction} ({error}); "
            "add examples or change the fraction"
        ) from None


def _smallest_limit(classes: int, val_fraction: float, available: int) -> int:
    """Return the smallest sample whose stratified validation and training parts both get
    every class, with the validation part rounded up as scikit-learn rounds it."""
    for count in range(2 * classes, available + 1):
        val = math.ceil(val_fraction * count)
        if val >= classes and count - val >= classes:
            return count
    return available


def _limit(x, y, limit: int, val_fraction: float, seed: int, source: str):
    if limit <= 0 or limit >= len(y):
        return x, y
    classes = len(np.unique(y))
    smallest = _smallest_limit(classes, val_fraction, len(y))
    if limit < smallest:
        raise DataError(
            f"{source}: data.train_limit={limit} is too small to give the training and "
            f"validation splits every one of the {classes} classes at "
            f"data.val_fraction={val_fraction:g}; use at least {smallest}, or 0 for all "
            f"{len(y)} examples"
        )
    x_kept, _, y_kept, _ = _stratified(x, y, 1.0 - limit / len(y), seed, "train_limit", source)
    return x_kept, y_kept


def _raw_splits(config: DataConfig, seed: int):
    """Return (x_train, y_train, x_test or None, y_test or None, source, class names, features).

    ``features`` lists the column names for CSV data and is None for the other formats.
    """
    if config.name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = digits.data.astype(np.float32), digits.target
        return x, y, None, None, "sklearn digits", None, None
    if config.name in ("fashion-mnist", "mnist"):
        folder = Path(config.path or FASHION_MNIST_DIR)
        x_train, y_train, x_test, y_test = load_idx_folder(folder)
        names = FASHION_MNIST_CLASSES if config.name == "fashion-mnist" else None
        return x_train, y_train, x_test, y_test, str(folder), names, None
    path = Path(config.path)
    if config.name == "csv":
        x, y, features = load_csv(path, config.label)
        return x, y, None, None, str(path), None, features
    x, y = load_npz(path)
    return x, y, None, None, str(path), None, None


def fingerprint(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        contiguous = np.ascontiguousarray(array)
        digest.update(str((contiguous.dtype.str, contiguous.shape)).encode())
        digest.update(contiguous.tobytes())
    return digest.hexdigest()


# A rule of thumb, not a measured limit: with fewer training examples of a class than this,
# accuracies and their seed-to-seed spread tell little about the class.
MIN_TRAIN_PER_CLASS = 5


def _warn_small_train(y_train: np.ndarray, num_classes: int, config: DataConfig, source: str):
    counts = np.bincount(y_train, minlength=num_classes)
    if counts.min() >= MIN_TRAIN_PER_CLASS:
        return
    fix = "lower data.val_fraction"
    if config.train_limit > 0:
        fix += " or raise data.train_limit"
    log.warning(
        "%s: the training split has only %d example(s) of class %d (%d in all, after "
        "data.val_fraction=%g and data.train_limit=%d); expect noisy results, or %s",
        source, counts.min(), int(counts.argmin()), len(y_train), config.val_fraction,
        config.train_limit, fix,
    )  # fmt: skip


def load_splits(config: DataConfig, seed: int) -> Splits:
    """Load, check and split the configured data; standardization comes from train only."""
    x, y, x_test, y_test, source, names, feature_names = _raw_splits(config, seed)
    check_features(x, source)
    y = check_labels(np.asarray(y), source)
    # Gaps in the label range are reported before splitting, whose error would be less clear.
    _check_classes(y, int(y.max()) + 1, source)
    if x_test is None:
        x, x_test, y, y_test = _stratified(x, y, config.test_fraction, seed, "test", source)
    else:
        check_features(x_test, source)
        y_test = check_labels(np.asarray(y_test), source)
        if x_test.shape[1] != x.shape[1]:
            raise DataError(
                f"{source}: test examples have {x_test.shape[1]} features, "
                f"training examples {x.shape[1]}"
            )

    x, y = _limit(x, y, config.train_limit, config.val_fraction, seed, source)
    num_classes = int(max(y.max(), y_test.max())) + 1
    _check_classes(y, num_classes, source)
    x_train, x_val, y_train, y_val = _stratified(x, y, config.val_fraction, seed, "val", source)
    _warn_small_train(y_train, num_classes, config, source)

    mean = x_train.mean(axis=0, dtype=np.float64)
    std = x_train.std(axis=0, dtype=np.float64)
    # Constant features (border pixels, say) have std 0: dividing by 1 leaves them at 0.
    std[std < 1e-8] = 1.0

    tensors = [
        torch.from_numpy(np.ascontiguousarray(a))
        for a in (x_train, y_train, x_val, y_val, x_test, y_test)
    ]
    names = names or [str(c) for c in range(num_classes)]
    return Splits(
        *tensors,
        num_classes=num_classes,
        class_names=list(names[:num_classes]),
        mean=torch.from_numpy(mean.astype(np.float32)),
        std=torch.from_numpy(std.astype(np.float32)),
        source=source,
        fingerprint=fingerprint(x_train, y_train, x_val, y_val, x_test, y_test),
        feature_names=feature_names,
    )
