from __future__ import annotations

import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


@pytest.fixture(autouse=True, scope="session")
def _dataset_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Generate MNIST-1D once per session, never into the user's cache."""
    os.environ.setdefault("QAT_LIGHTNING_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
