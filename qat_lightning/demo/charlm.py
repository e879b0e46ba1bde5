"""A character-level language model task that ships with Python: the documentation topics of
``pydoc`` (``pydoc_data.topics``, about 460 000 characters; nothing is downloaded), and a tiny
Hugging Face ``LlamaForCausalLM`` (random init) to train on it. The app's ``data=pydoc_chars
model=char_llama`` and the ``experiment=lm_*`` recipes use them.

The text is the running Python's: it changes between patch releases (3.11.2 ships 466 019
characters of topics, 3.11.7 464 970), and with it every number trained on it. The benchmark
prints :func:`pydoc_fingerprint` next to its table."""
from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .._validate import check_number


def pydoc_text() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "".join(topics[k] for k in sorted(topics))


def pydoc_fingerprint() -> str:
    """The Python version, the text's length and the start of its sha256: which text a number was measured on."""
    import hashlib
    import platform

    text = pydoc_text()
    return f"Python {platform.python_version()}, pydoc text {len(text)} characters, sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]}"


class CharWindows(Dataset):
    """Random windows of ``context + 1`` characters: the input and the next-character targets."""

    def __init__(self, ids: torch.Tensor, context: int, samples: int, seed: int) -> None:
        self.ids, self.context = ids, context
        self.starts = torch.randint(0, len(ids) - context - 1, (samples,), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.ids[self.starts[i] : self.starts[i] + self.context + 1]
        return window[:-1], window[1:]


class PydocCharsDataModule(pl.LightningDataModule):
    """``pydoc_data`` text as characters: the first 90 % for training windows, the rest split in
    half for validation and test windows (fixed, seeded starts)."""

    def __init__(self, context: int = 64, batch_size: int = 32, train_windows: int = 32768, val_windows: int = 1024,
                 test_windows: int = 2048, seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.context = check_number("context", context, low=1, integer=True)
        self.batch_size = check_number("batch_size", batch_size, low=1, integer=True)
        self.train_windows = check_number("train_windows", train_windows, low=1, integer=True)
        self.val_windows = check_number("val_windows", val_windows, low=1, integer=True)
        self.test_windows = check_number("test_windows", test_windows, low=1, integer=True)
        self.seed = check_number("seed", seed, low=0, integer=True)
        # one stream over fits: a fit after pretraining sees new batches (its state can be saved and restored)
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        text = pydoc_text()
        self.alphabet = sorted(set(text))
        index = {c: i for i, c in enumerate(self.alphabet)}
        self.ids = torch.tensor([index[c] for c in text])

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def _split(self, part: str) -> torch.Tensor:
        train, val = int(0.9 * len(self.ids)), int(0.95 * len(self.ids))
        return {"train": self.ids[:train], "val": self.ids[train:val], "test": self.ids[val:]}[part]

    def train_dataloader(self) -> DataLoader:
        windows = CharWindows(self._split("train"), self.context, self.train_windows, self.seed)
        return DataLoader(windows, batch_size=self.batch_size, shuffle=True, generator=self.shuffle_generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(CharWindows(self._split("val"), self.context, self.val_windows, self.seed + 1), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(CharWindows(self._split("test"), self.context, self.test_windows, self.seed + 2), batch_size=self.batch_size)


class CharLlama(pl.LightningModule):
    """A tiny ``LlamaForCausalLM`` (random init) over characters: logs ``train/loss`` and
    validation / test bits per character (``val/bpc``, ``test/bpc``). AdamW, no weight decay."""

    def __init__(self, vocab_size: int = 100, hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                 intermediate: int = 256, context: int = 64, lr: float = 5e-4) -> None:  # fmt: skip
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.lr = check_number("lr", lr, low=0, low_open=True)
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context,
                             bos_token_id=0, eos_token_id=0, tie_word_embeddings=False, use_cache=False)  # fmt: skip
        self.net = LlamaForCausalLM(config)
        self.save_hyperparameters()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids).logits

    def _bpc(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(self(inputs).flatten(0, 1).float(), targets.flatten()) / math.log(2)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._bpc(batch) * math.log(2)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/bpc", self._bpc(batch), prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("test/bpc", self._bpc(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)
