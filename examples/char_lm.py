"""A character-level transformer language model trained with DiffQ (weights) + EMAFakeQuant (8-bit
activations), on text that ships with Python itself: the documentation topics of ``pydoc``
(``pydoc_data.topics``, ~460 000 characters). Nothing is downloaded.

The input embedding and the output layer share one weight (tied), which DiffQ quantizes once.
Prints validation bits per character with float and with true quantized weights, and the size.

    python examples/char_lm.py [--steps 3000] [--smoke]
"""
from __future__ import annotations

import argparse
import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from qat_lightning import DiffQ, EMAFakeQuant
from qat_lightning.demo.charlm import CharWindows, pydoc_text


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attention)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class CharLM(pl.LightningModule):
    def __init__(self, vocab: int, context: int = 64, dim: int = 128, depth: int = 2, heads: int = 4, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(context, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied input / output embedding
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[: ids.shape[1]]
        return self.head(self.norm(self.blocks(x)))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, targets = batch
        return F.cross_entropy(self(ids).flatten(0, 1), targets.flatten())

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:  # noqa: ANN001
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:  # noqa: ANN001
        self.log("val/bpc", self._loss(batch) / math.log(2), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--penalty", type=float, default=1.0)
    parser.add_argument("--smoke", action="store_true", help="a few steps of a tiny model (CI)")
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)

    text = pydoc_text()
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    ids = torch.tensor([index[c] for c in text])
    split = int(0.9 * len(ids))
    samples = 64 if args.smoke else 64 * args.steps
    train = DataLoader(CharWindows(ids[:split], args.context, samples, seed=0), batch_size=64, shuffle=False)
    val = DataLoader(CharWindows(ids[split:], args.context, 16 if args.smoke else 2048, seed=1), batch_size=64)

    model = CharLM(len(alphabet), args.context, dim=32 if args.smoke else 128, depth=1 if args.smoke else 2)
    diffq = DiffQ(penalty=args.penalty, bits_lr=1e-2, min_bits=3, min_size=0.001, exclude=["position"])
    ema = EMAFakeQuant(weights=False, activation_bits=8)  # DiffQ owns the weights
    trainer = pl.Trainer(max_steps=4 if args.smoke else args.steps, val_check_interval=None if args.smoke else 500,
                         callbacks=[diffq, ema], logger=False, enable_checkpointing=False,
                         enable_progress_bar=not args.smoke, accelerator="cpu")  # fmt: skip
    trainer.fit(model, train, val)

    quantized = trainer.validate(model, val, verbose=False)[0]["val/bpc"]  # true quantized weights, 8-bit activations
    diffq.quantize_eval, ema.evaluate_quantized = False, False
    floating = trainer.validate(model, val, verbose=False)[0]["val/bpc"]
    q = diffq.quantizer
    print(f"validation bits per character: float {floating:.3f}, quantized {quantized:.3f}")
    print(f"size: {q.float_model_size():.3f} MB -> {q.true_model_size():.3f} MB "
          f"({q.float_model_size() / q.true_model_size():.1f}x, {q.average_bits(exact=True):.2f} bits/weight)")  # fmt: skip


if __name__ == "__main__":
    main()
