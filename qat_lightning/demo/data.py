"""MNIST-1D as a LightningDataModule: generated locally by the ``mnist1d`` package, never downloaded."""
from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .._validate import check_number


def default_cache_dir() -> Path:
    return Path(os.environ.get("QAT_LIGHTNING_CACHE", Path.home() / ".cache" / "qat_lightning"))


def generate_mnist1d(num_samples: int = 5000, seed: int = 42, train_split: float = 0.8) -> dict[str, np.ndarray]:
    """Generate MNIST-1D with the package's own generator (the download path is never used)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = num_samples, seed, train_split
    data = make_dataset(args)
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


class MNIST1DDataModule(pl.LightningDataModule):
    """MNIST-1D (40-sample 1-D signals, 10 classes), cached as ``.npz`` (no pickle) after first use.

    The generator's train split is divided into train and validation (``val_fraction``); its
    test split is the test set.

    Example::

        dm = MNIST1DDataModule(batch_size=100)
        trainer.fit(model, dm); trainer.test(model, dm)
    """

    def __init__(
        self,
        num_samples: int = 5000,
        seed: int = 42,
        train_split: float = 0.8,
        val_fraction: float = 0.1,
        batch_size: int = 100,
        num_workers: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.num_samples = check_number("num_samples", num_samples, low=100, integer=True)
        self.seed = check_number("seed", seed, low=0, integer=True)
        self.train_split = check_number("train_split", train_split, low=0, high=1, low_open=True, high_open=True)
        self.val_fraction = check_number("val_fraction", val_fraction, low=0, high=1, high_open=True)
        self.batch_size = check_number("batch_size", batch_size, low=1, integer=True)
        self.num_workers = check_number("num_workers", num_workers, low=0, integer=True)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.save_hyperparameters()

    @property
    def cache_file(self) -> Path:
        return self.cache_dir / f"mnist1d_n{self.num_samples}_s{self.seed}_t{self.train_split}.npz"

    def prepare_data(self) -> None:
        if self.cache_file.exists():
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        arrays = generate_mnist1d(self.num_samples, self.seed, self.train_split)
        tmp = self.cache_file.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, self.cache_file)  # atomic: concurrent runs never read a half-written file

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        self.prepare_data()
        with np.load(self.cache_file, allow_pickle=False) as arrays:
            x, y = torch.tensor(arrays["x"], dtype=torch.float32), torch.tensor(arrays["y"], dtype=torch.long)
            x_test, y_test = torch.tensor(arrays["x_test"], dtype=torch.float32), torch.tensor(arrays["y_test"], dtype=torch.long)
        n_val = int(round(len(x) * self.val_fraction))
        self.train_set = TensorDataset(x[n_val:], y[n_val:])
        self.val_set = TensorDataset(x[:n_val], y[:n_val]) if n_val else TensorDataset(x_test, y_test)
        self.test_set = TensorDataset(x_test, y_test)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, self.batch_size, shuffle=True, num_workers=self.num_workers, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, self.batch_size, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
