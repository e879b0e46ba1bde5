"""``python -m qat_lightning.export <checkpoint> <out>``: see :mod:`qat_lightning.export.checkpoint`."""
import sys

from .checkpoint import main

sys.exit(main())
