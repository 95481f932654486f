"""Tiny fixtures shared by the tests: generated, never read from ../shared."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _user_cache(tmp_path_factory, monkeypatch):
    """Backend timings and on-the-fly exports (useg.autotune) go to a temporary cache, not ~/.cache."""
    monkeypatch.setenv("USEG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "useg-cache"))


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny tensor ops on one thread.

    On a shared, loaded CPU, OpenMP threads spin-waiting on each other make tiny convs ~100x slower.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def cells_dir(tmp_path_factory):
    """A tiny synthetic cells dataset (images/, masks/ 0/255, instances/) of 64x64 images."""
    from useg.synthetic import write_cells_dataset

    return write_cells_dataset(tmp_path_factory.mktemp("cells"), n_images=6, shape=(64, 64), seed=3)
