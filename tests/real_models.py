"""Model code no one here wrote, tiny and random-init: Hugging Face GPT-2 / Llama / BERT (from their
configs, nothing downloaded), ``nn.TransformerEncoder``, an LSTM language model, and BatchNorm CNNs
in the style of ResNet (basic blocks, residuals) and MobileNetV3 (depthwise convolutions,
Hardswish, squeeze-excite with Hardsigmoid), each wrapped in a LightningModule with its own data."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB, SEQ, IMAGE = 64, 16, 16


def _hf(name: str) -> nn.Module:
    import transformers

    common = dict(vocab_size=VOCAB, max_position_embeddings=SEQ * 2)
    if name == "gpt2":  # lm_head tied to wte
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=SEQ * 2, vocab_size=VOCAB,
                                                                    bos_token_id=0, eos_token_id=0))  # fmt: skip
    if name == "llama":
        config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                          num_key_value_heads=1, bos_token_id=0, eos_token_id=0, **common)  # fmt: skip
        return transformers.LlamaForCausalLM(config)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_labels=3,
                                     pad_token_id=0, **common)  # fmt: skip
    return transformers.BertForSequenceClassification(config)


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` (MultiheadAttention, padding mask by keyword) as a token classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.encoder(self.embed(tokens), mask=mask, is_causal=True))


class LSTMLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.lstm = nn.LSTM(32, 48, num_layers=2, batch_first=True)
        self.head = nn.Linear(48, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(tokens))[0])


class BasicBlock(nn.Module):
    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        inner = channels * stride
        self.conv1 = nn.Conv2d(channels, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.down = None if stride == 1 else nn.Sequential(nn.Conv2d(channels, inner, 1, stride, bias=False), nn.BatchNorm2d(inner))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.down is None else self.down(x)))


class ResNetish(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(16), BasicBlock(16, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, channels // 4, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(channels // 4, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    def __init__(self, channels: int, expand: int) -> None:
        super().__init__()
        hidden = channels * expand
        self.block = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish(),
            nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish(),  # depthwise
            SqueezeExcite(hidden),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class MobileNetish(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(InvertedResidual(16, 2), InvertedResidual(16, 3))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.Hardswish(), nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class Wrapped(pl.LightningModule):
    """A LightningModule around ``net``: token models predict the next token, image models a class."""

    def __init__(self, net: nn.Module, task: str) -> None:
        super().__init__()
        self.net, self.task = net, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.logits if hasattr(out, "logits") else out

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        if self.task == "lm":
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        return F.cross_entropy(logits.float(), y)

    log_loss = True  # False for a torch.compile'd training_step: dynamo cannot trace Lightning's self.log (2.6)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        if self.log_loss:
            self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


BUILDERS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "gpt2": (lambda: _hf("gpt2"), "lm"),
    "llama": (lambda: _hf("llama"), "lm"),
    "bert": (lambda: _hf("bert"), "classify_tokens"),
    "transformer_encoder": (Encoder, "lm"),
    "lstm": (LSTMLM, "lm"),
    "resnet": (ResNetish, "image"),
    "mobilenet": (MobileNetish, "image"),
}
MODELS = tuple(BUILDERS)


def build(name: str, seed: int = 0) -> Wrapped:
    torch.manual_seed(seed)
    make, task = BUILDERS[name]
    return Wrapped(make(), "lm" if task == "lm" else "classify")


def loader(name: str, n: int = 16, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    task = BUILDERS[name][1]
    if task == "image":
        x = torch.randn(n, 3, IMAGE, IMAGE, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
    else:
        x = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def sample(name: str) -> torch.Tensor:
    return next(iter(loader(name, n=4, batch_size=4)))[0]
