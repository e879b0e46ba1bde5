"""The README's usage example: DiffQ on an existing LightningModule, nothing changed in the module.

    python examples/quickstart.py [--epochs 30]
"""
import argparse

import lightning.pytorch as pl

from qat_lightning import DiffQ
from qat_lightning.demo import MLP, Classifier, MNIST1DDataModule

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=30)
parser.add_argument("--batches", type=int, default=None, help="limit train batches per epoch (smoke runs)")
args = parser.parse_args()

# --8<-- [start:usage]
model = Classifier(MLP(hidden=[512, 512]))              # any LightningModule
data = MNIST1DDataModule(num_samples=20000)
diffq = DiffQ(penalty=1.0, bits_lr=1e-2, min_bits=3)   # learned bits + size penalty
trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[diffq], limit_train_batches=args.batches)
trainer.fit(model, data)                                # validation runs on true quantized weights
trainer.test(model, data)                               # so does test

q = diffq.quantizer
print(f"{q.float_model_size():.3f} MB -> {q.true_model_size():.3f} MB "
      f"({q.float_model_size() / q.true_model_size():.1f}x, {q.average_bits(exact=True):.2f} bits/weight)")
# --8<-- [end:usage]
