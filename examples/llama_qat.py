"""QAT fine-tuning of a Llama-style character language model (Hugging Face ``LlamaForCausalLM``,
random init, trained here) on text that ships with Python (``pydoc_data.topics``). Nothing is
downloaded.

1. train the float model; 2. for each scheme, post-training quantize the float model (PTQ) and
measure; 3. fine-tune it with the scheme's callback (QAT) for the same number of steps as a float
fine-tune (the control); 4. print bits per character and the share of the PTQ degradation that QAT
recovers: ``(PTQ - QAT) / (PTQ - float fine-tuned)``.

Schemes: ``int4_g32`` weights + ``int8_per_token`` activations at the layers' inputs (torchao's
int8-dynamic-activation / int4-weight QAT); LSQ 4-bit per-channel weights (learned steps) with the
same activations; DiffQ (learned bits, PTQ at its initial 4 bits).

    python examples/llama_qat.py [--pretrain-steps 1500] [--qat-steps 500] [--smoke]
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from qat_lightning import DiffQ, DiffQuantizer, EMAFakeQuant, EMAFakeQuantizer
from qat_lightning.demo.charlm import CharWindows, pydoc_text


class LlamaLM(pl.LightningModule):
    def __init__(self, vocab: int, dim: int, layers: int, lr: float) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                             num_attention_heads=max(1, dim // 32), num_key_value_heads=max(1, dim // 64), max_position_embeddings=128,
                             bos_token_id=0, eos_token_id=0, tie_word_embeddings=False, use_cache=False)  # fmt: skip
        self.net = LlamaForCausalLM(config)
        self.lr = lr

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids).logits

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(self(inputs).flatten(0, 1).float(), targets.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/bpc", self._loss(batch) / math.log(2))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def _trainer(steps: int, callbacks: list, smoke: bool) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False, accelerator="cpu",
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0 if not smoke else 1)  # fmt: skip


def _bpc(model: LlamaLM, val: DataLoader, callbacks: list | None = None) -> float:
    trainer = _trainer(1, callbacks or [], True)
    trainer.limit_val_batches = 1.0
    return float(trainer.validate(model, val, verbose=False)[0]["val/bpc"])


SCHEMES = {
    "int4_g32 + int8_per_token": dict(weight_format="int4_g32", activation_format="int8_per_token", activation_position="inputs"),
    "LSQ W4 + int8_per_token": dict(weight_format="distiller4_symmetric_per_channel_lsq", activation_format="int8_per_token",
                                    activation_position="inputs"),  # fmt: skip
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--qat-steps", type=int, default=500)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="a few steps of a tiny model (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.pretrain_steps, args.qat_steps, args.dim, args.layers = 3, 2, 64, 1
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    text = pydoc_text()
    alphabet = sorted(set(text))
    ids = torch.tensor([{c: i for i, c in enumerate(alphabet)}[c] for c in text])
    split = int(0.9 * len(ids))
    batch = 32
    train = lambda steps, seed: DataLoader(CharWindows(ids[:split], args.context, steps * batch, seed), batch_size=batch)  # noqa: E731
    val = DataLoader(CharWindows(ids[split:], args.context, 8 * batch if args.smoke else 64 * batch, seed=99), batch_size=batch)

    start = time.time()
    base = LlamaLM(len(alphabet), args.dim, args.layers, lr=3e-3)
    _trainer(args.pretrain_steps, [], args.smoke).fit(base, train(args.pretrain_steps, 0))
    float_bpc = _bpc(base, val)
    tuned = copy.deepcopy(base)
    tuned.lr = 5e-4
    _trainer(args.qat_steps, [], args.smoke).fit(tuned, train(args.qat_steps, 1))
    control = _bpc(tuned, val)
    rows = [("float", float_bpc, None, None, None), (f"float fine-tuned {args.qat_steps} steps", control, None, None, None)]

    for label, options in SCHEMES.items():
        ptq_model = copy.deepcopy(base)
        ptq_options = dict(options, weight_format=options["weight_format"].removesuffix("_lsq"))
        quantizer = EMAFakeQuantizer(ptq_model, **ptq_options).prepare()
        ptq = _bpc(ptq_model, val)
        bits = quantizer.bits_per_weight()
        quantizer.remove()
        qat_model = copy.deepcopy(base)
        qat_model.lr = 5e-4
        callback = EMAFakeQuant(**options)
        _trainer(args.qat_steps, [callback], args.smoke).fit(qat_model, train(args.qat_steps, 1))
        rows.append((label, None, ptq, _bpc(qat_model, val, [callback]), bits))

    ptq_model = copy.deepcopy(base)
    diffq_ptq = DiffQuantizer(ptq_model, init_bits=4, min_size=0.001)
    ptq_model.eval()
    with diffq_ptq.quantized():
        ptq = _bpc(ptq_model, val)
    diffq_ptq.detach()
    qat_model = copy.deepcopy(base)
    qat_model.lr = 5e-4
    diffq = DiffQ(init_bits=4, min_size=0.001, penalty=1.0, bits_lr=1e-2)
    _trainer(args.qat_steps, [diffq], args.smoke).fit(qat_model, train(args.qat_steps, 1))
    rows.append(("DiffQ (learned bits, from 4)", None, ptq, _bpc(qat_model, val, [diffq]), float(diffq.quantizer.average_bits(exact=True))))

    print(f"Llama {args.layers}x{args.dim}, {sum(p.numel() for p in base.parameters())} parameters, vocabulary {len(alphabet)}; "
          f"pretrain {args.pretrain_steps} steps, QAT / fine-tune {args.qat_steps} steps; {time.time() - start:.0f} s")  # fmt: skip
    print("| scheme | bits/weight | PTQ bpc | QAT bpc | recovered |")
    print("|---|---|---|---|---|")
    for label, value, ptq, qat, bits in rows:
        if ptq is None:
            print(f"| {label} | 32 | {value:.4f} | | |")
            continue
        gap = ptq - control
        recovered = (ptq - qat) / gap if gap > 0 else float("nan")
        print(f"| {label} | {bits:.2f} | {ptq:.4f} | {qat:.4f} | {recovered:.0%} |")


if __name__ == "__main__":
    main()
