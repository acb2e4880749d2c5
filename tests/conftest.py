"""Fixtures shared by the test modules."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped where no CUDA device is available.

    ``LAFTR_TEST_DEVICE=cpu`` runs them on the CPU instead (a check of the tests on a machine without a GPU).
    """
    if torch.cuda.is_available() or not os.environ.get("LAFTR_TEST_DEVICE", "cuda").startswith("cuda"):
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def float64():
    """float64 as torch's default dtype (exact comparisons) and torch's global seed 0, for one test."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def one_thread():
    """One torch thread for the test (small networks on a shared machine), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



@pytest.fixture
def float64_one_thread():
    """float64 as torch's default dtype and one torch thread (the influence solvers' tiny problems only lose to
    thread synchronization on a shared machine), both restored afterwards; no seed is set."""
    old, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(old)
    torch.set_num_threads(threads)
