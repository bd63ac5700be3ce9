"""Data readers, input checks, splits and standardization."""

import gzip
import struct

import numpy as np
import pytest
import torch

from kdistill.config import DataConfig
from kdistill.data import DataError, load_splits, read_idx


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    content = header + array.tobytes()
    path.write_bytes(gzip.compress(content) if compress else content)


def make_idx_folder(folder, train: int = 200, test: int = 50, compress: bool = True) -> None:
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for stem, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(count, 4, 4), dtype=np.uint8)
        labels = (np.arange(count) % 3).astype(np.uint8)
        write_idx(folder / f"{stem}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{stem}-labels-idx1-ubyte{suffix}", labels, compress)


def write_csv(path, rows, header=("a", "b", "label")) -> None:
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def balanced_rows(count: int = 60, classes: int = 3):
    rng = np.random.default_rng(1)
    return [(float(rng.normal()), float(rng.normal()), i % classes) for i in range(count)]


def test_digits_split_sizes_and_classes():
    splits = load_splits(DataConfig(), seed=0)
    sizes = splits.sizes()
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == 360
    assert splits.num_classes == 10
    assert splits.num_features == 64
    assert splits.x_train.dtype == torch.float32
    assert splits.y_train.dtype == torch.int64


def test_split_is_deterministic_per_seed():
    first = load_splits(DataConfig(), seed=3)
    second = load_splits(DataConfig(), seed=3)
    other = load_splits(DataConfig(), seed=4)
    assert torch.equal(first.x_train, second.x_train)
    assert torch.equal(first.y_test, second.y_test)
    assert first.fingerprint == second.fingerprint
    assert first.fingerprint != other.fingerprint


def test_split_is_stratified():
    splits = load_splits(DataConfig(), seed=0)
    train_share = torch.bincount(splits.y_train) / len(splits.y_train)
    test_share = torch.bincount(splits.y_test) / len(splits.y_test)
    assert (train_share - test_share).abs().max() < 0.01


def test_standardization_uses_train_only():
    splits = load_splits(DataConfig(), seed=0)
    expected = splits.x_train.double().mean(dim=0).float()
    assert torch.allclose(splits.mean, expected, atol=1e-5)
    everything = torch.cat([splits.x_train, splits.x_val, splits.x_test]).double().mean(dim=0)
    assert not torch.allclose(splits.mean, everything.float(), atol=1e-5)
    # Constant pixels (digits' left column is always 0) get std 1, not 0.
    assert (splits.std > 0).all()


def test_idx_folder_gzipped(tmp_path):
    make_idx_folder(tmp_path)
    cfg = DataConfig(name="mnist", path=str(tmp_path), val_fraction=0.1)
    splits = load_splits(cfg, seed=0)
    assert splits.sizes() == {"train": 180, "val": 20, "test": 50}
    assert splits.num_features == 16
    assert float(splits.x_train.max()) <= 1.0


def test_idx_folder_uncompressed(tmp_path):
    make_idx_folder(tmp_path, compress=False)
    splits = load_splits(DataConfig(name="mnist", path=str(tmp_path)), seed=0)
    assert splits.num_classes == 3


def test_idx_truncated_file_named(tmp_path):
    make_idx_folder(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_idx_missing_folder_named(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        load_splits(DataConfig(name="mnist", path=str(tmp_path / "none")), seed=0)


def test_idx_row_mismatch(tmp_path):
    make_idx_folder(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(49, dtype=np.uint8), True)
    with pytest.raises(DataError, match="50 rows but .* has 49 labels"):
        load_splits(DataConfig(name="mnist", path=str(tmp_path)), seed=0)


def test_fashion_mnist_package_if_installed():
    from pathlib import Path

    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    splits = load_splits(DataConfig(name="fashion-mnist", train_limit=2000), seed=0)
    assert splits.sizes()["test"] == 10000
    assert splits.num_features == 784
    assert splits.class_names[9] == "Ankle boot"


def test_csv_loads(tmp_path):
    path = tmp_path / "d.csv"
    write_csv(path, balanced_rows())
    splits = load_splits(DataConfig(name="csv", path=str(path)), seed=0)
    assert splits.num_features == 2
    assert splits.num_classes == 3


def test_csv_non_numeric_named(tmp_path):
    rows = balanced_rows()
    rows[4] = (1.0, "oops", 1)
    path = tmp_path / "d.csv"
    write_csv(path, rows)
    with pytest.raises(DataError, match=r"line 6, column 'b': 'oops' is not a number"):
        load_splits(DataConfig(name="csv", path=str(path)), seed=0)


def test_csv_missing_label_column(tmp_path):
    path = tmp_path / "d.csv"
    write_csv(path, balanced_rows(), header=("a", "b", "target"))
    with pytest.raises(DataError, match="set data.label"):
        load_splits(DataConfig(name="csv", path=str(path)), seed=0)


def test_csv_nan_feature_named(tmp_path):
    rows = balanced_rows()
    rows[7] = (float("nan"), 0.0, 1)
    path = tmp_path / "d.csv"
    write_csv(path, rows)
    with pytest.raises(DataError, match="NaN or infinite"):
        load_splits(DataConfig(name="csv", path=str(path)), seed=0)


def npz(tmp_path, x, y):
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    return DataConfig(name="npz", path=str(path))


def test_npz_loads_and_flattens(tmp_path):
    x = np.random.default_rng(0).normal(size=(90, 2, 3)).astype(np.float32)
    y = np.arange(90) % 3
    splits = load_splits(npz(tmp_path, x, y), seed=0)
    assert splits.num_features == 6


def test_npz_infinite_feature(tmp_path):
    x = np.zeros((90, 3), dtype=np.float32)
    x[5, 2] = np.inf
    with pytest.raises(DataError, match="row 5, column 2"):
        load_splits(npz(tmp_path, x, np.arange(90) % 3), seed=0)


def test_npz_fractional_label(tmp_path):
    y = (np.arange(90) % 3).astype(np.float64)
    y[3] = 1.5
    with pytest.raises(DataError, match="1.5 is not an integer"):
        load_splits(npz(tmp_path, np.zeros((90, 3)), y), seed=0)


def test_npz_negative_label(tmp_path):
    y = np.arange(90) % 3 - 1
    with pytest.raises(DataError, match="negative"):
        load_splits(npz(tmp_path, np.zeros((90, 3)), y), seed=0)


def test_npz_class_without_examples(tmp_path):
    y = np.where(np.arange(90) % 3 == 1, 3, np.arange(90) % 3)  # labels 0, 2, 3: no class 1
    with pytest.raises(DataError, match=r"class\(es\) \[1\] have no training example"):
        load_splits(npz(tmp_path, np.zeros((90, 3)), y), seed=0)


def test_npz_row_count_mismatch(tmp_path):
    with pytest.raises(DataError):
        load_splits(npz(tmp_path, np.zeros((90, 3)), np.arange(80) % 3), seed=0)


def test_npz_missing_array_named(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, features=np.zeros((10, 2)), y=np.zeros(10))
    with pytest.raises(DataError, match=r"missing array\(s\) \['x'\]"):
        load_splits(DataConfig(name="npz", path=str(path)), seed=0)


def test_npz_pickled_object_rejected(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([{"a": 1}] * 10, dtype=object), y=np.zeros(10))
    with pytest.raises(DataError):
        load_splits(DataConfig(name="npz", path=str(path)), seed=0)


def test_train_limit_is_stratified(tmp_path):
    splits = load_splits(DataConfig(train_limit=500), seed=0)
    assert splits.sizes()["train"] + splits.sizes()["val"] == 500
    assert torch.bincount(splits.y_train).min() > 0


def test_idx_truncated_gzip_named(tmp_path):
    make_idx_folder(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(path)


def test_npz_not_a_zip_named(tmp_path):
    path = tmp_path / "d.npz"
    path.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="cannot read as .npz"):
        load_splits(DataConfig(name="npz", path=str(path)), seed=0)


def test_npz_row_mismatch_named(tmp_path):
    with pytest.raises(DataError, match="x has 90 rows but y has 80 labels"):
        load_splits(npz(tmp_path, np.zeros((90, 3)), np.arange(80) % 3), seed=0)


def test_labels_from_one_get_hint(tmp_path):
    with pytest.raises(DataError, match="subtract 1"):
        load_splits(npz(tmp_path, np.zeros((90, 3)), np.arange(90) % 3 + 1), seed=0)


def test_tiny_training_split_warns(caplog):
    with caplog.at_level("WARNING", logger="kdistill.data"):
        load_splits(DataConfig(name="digits", train_limit=60, val_fraction=0.5), seed=0)
    assert "the training split has only" in caplog.text
    assert "data.train_limit=60" in caplog.text


def test_default_digits_split_does_not_warn(caplog):
    with caplog.at_level("WARNING", logger="kdistill.data"):
        load_splits(DataConfig(name="digits"), seed=0)
    assert caplog.text == ""


@pytest.mark.parametrize("limit", [1, 20, 45])
def test_too_small_train_limit_names_minimum(limit):
    # With 10 classes and val_fraction 0.2, 46 is the first size whose validation part,
    # 20 % rounded up (ceil(9.2) = 10), has one example per class.
    with pytest.raises(DataError, match=rf"train_limit={limit} is too small.*at least 46"):
        load_splits(DataConfig(name="digits", train_limit=limit), seed=0)


def test_smallest_train_limit_loads():
    splits = load_splits(DataConfig(name="digits", train_limit=46), seed=0)
    assert splits.sizes()["train"] + splits.sizes()["val"] == 46
