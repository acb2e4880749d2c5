"""Data sets for the experiments: image, small bundled, regression and token-sequence sets.

Fashion-MNIST, MNIST, CIFAR-10/100, small bundled sets, regression tables, modular arithmetic (token sequences
for transformers).

All loaders return a :class:`Dataset` of in-memory tensors and never download anything.
"""

from .arithmetic import ARITHMETIC_TASKS, arithmetic_tasks, load_arithmetic
from .datasets import (
    CIFAR10_CLASSES,
    DATASET_NAMES,
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
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
)
from .idx import read_idx, write_idx

__all__ = [
    "ARITHMETIC_TASKS",
    "CIFAR10_CLASSES",
    "DATASET_NAMES",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "REGRESSION_NAMES",
    "Dataset",
    "DatasetNotFoundError",
    "arithmetic_tasks",
    "default_dataset",
    "fashion_mnist_available",
    "load_arithmetic",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "load_mnist_sample",
    "load_regression",
    "read_idx",
    "write_idx",
]
