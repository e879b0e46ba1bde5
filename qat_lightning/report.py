"""``python -m qat_lightning.report <sweep dir>``: the sweep report (:mod:`qat_lightning.app.report`)."""
from .app.report import main

if __name__ == "__main__":
    main()
