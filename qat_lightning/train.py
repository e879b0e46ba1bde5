"""``python -m qat_lightning.train [overrides]``: the Hydra app (:mod:`qat_lightning.app.train`)."""
from .app.train import main

if __name__ == "__main__":
    main()
