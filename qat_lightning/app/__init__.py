"""The Hydra app: ``train`` (``python -m qat_lightning.train``), the sweep ``report``
(``python -m qat_lightning.report``), the per-layer ``plots``, and their ``conf/``."""
