import numpy as np
import pytest
import torch

from qat_lightning import DiffQ
from qat_lightning.demo import CNN1D, Classifier, MLP, MNIST1DDataModule


def test_mnist1d_is_generated_cached_without_pickle_and_deterministic(tmp_path) -> None:
    dm = MNIST1DDataModule(num_samples=1000, cache_dir=str(tmp_path), val_fraction=0.1)
    dm.setup()
    assert dm.cache_file.exists()
    with np.load(dm.cache_file, allow_pickle=False) as arrays:  # plain arrays: loads with pickle off
        assert arrays["x"].shape == (800, 40) and arrays["x_test"].shape == (200, 40)
    assert len(dm.train_set) == 720 and len(dm.val_set) == 80 and len(dm.test_set) == 200
    again = MNIST1DDataModule(num_samples=1000, cache_dir=str(tmp_path / "other"))
    again.setup()
    assert torch.equal(again.test_set.tensors[0], dm.test_set.tensors[0])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 40) and x.dtype == torch.float32 and y.max() < 10


def test_models_shapes() -> None:
    x = torch.randn(3, 40)
    assert MLP()(x).shape == (3, 10)
    assert CNN1D()(x).shape == (3, 10)
    assert Classifier(MLP(hidden=[8]))(x).shape == (3, 10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 10}, "num_samples must be an integer >= 100"),
        ({"train_split": 1.0}, "train_split must be a number > 0 and < 1"),
        ({"val_fraction": -0.1}, "val_fraction must be a number >= 0 and < 1"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"num_workers": -1}, "num_workers must be an integer >= 0"),
        ({"seed": 1.5}, "seed must be an integer >= 0"),
    ],
)
def test_datamodule_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MNIST1DDataModule(**kwargs)


def test_classifier_errors() -> None:
    with pytest.raises(ValueError, match="lr must be a number > 0"):
        Classifier(MLP(), lr=0)
    with pytest.raises(ValueError, match="weight_decay must be a number >= 0"):
        Classifier(MLP(), weight_decay=-1)


def test_callback_outside_a_trainer_says_so() -> None:
    with pytest.raises(RuntimeError, match="attached in setup\\(\\); use it through a Trainer"):
        DiffQ().on_train_epoch_end(None, None)  # type: ignore[arg-type]
