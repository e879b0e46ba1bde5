"""AdaScale post-training quantization: parametrisation, folding, blocks, training, callback."""
import logging

import pytest
import torch
from torch import nn

from qat_lightning import AdaScale, DiffQ, EMAFakeQuant, apply_adascale, round_to_nearest
from qat_lightning.calibration.adascale import AdaScaleParams, _freeze, find_blocks
from qat_lightning.quantizers.weight import LearnedStepWeight
from qat_lightning.demo import CNN1D, MLP, TinyTransformer

from .helpers import tiny_loader, tiny_model, tiny_trainer


@pytest.mark.parametrize("shape", [(6, 10), (5, 3, 4)])
def test_zero_init_is_plain_symmetric_round_to_nearest(shape: tuple) -> None:
    w = torch.randn(shape) * torch.logspace(-1, 1, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    params = AdaScaleParams(w, bits=4)
    scale = 2 * w.flatten(1).abs().amax(1) / 15
    expected = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(shape[0], dtype=torch.int32), 0, -8, 7)
    assert torch.equal(params(w), expected)


@pytest.mark.parametrize("layer", [nn.Linear(12, 7), nn.Conv2d(3, 5, 3), nn.Conv1d(4, 6, 2)])
def test_folding_preserves_the_quantized_weight_exactly(layer: nn.Module) -> None:
    params = AdaScaleParams(layer.weight.detach(), bits=3)
    with torch.no_grad():
        for p in params.parameters():
            p.uniform_(-0.3, 0.3)
    trained = params(layer.weight.detach())
    quantizer = LearnedStepWeight(layer.weight.shape[0], 3, "symmetric", axis=0)
    _freeze(quantizer, params, layer)
    assert torch.equal(quantizer(layer.weight), trained)
    assert not quantizer.step.requires_grad


def test_block_detection() -> None:
    assert [n for n, _ in find_blocks(MLP())] == ["0", "2", "4"]
    assert [n for n, _ in find_blocks(CNN1D())] == ["features.0", "features.2", "features.4", "head"]
    assert [n for n, _ in find_blocks(TinyTransformer())] == ["embed", "blocks.0", "blocks.1", "head"]
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), num_layers=2)
    assert [n for n, _ in find_blocks(encoder)] == ["layers.0", "layers.1"]
    assert [n for n, _ in find_blocks(TinyTransformer(), block_types=[nn.Linear])][:2] == ["embed", "blocks.0.qkv"]


def _trained_mlp() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = MLP(in_features=16, hidden=(32, 32), num_classes=8)
    data = [(torch.randn(64, 16), torch.randint(0, 8, (64,))) for _ in range(4)]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        for x, y in data:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model, data


def test_training_lowers_every_block_loss_and_installs_frozen_weights() -> None:
    model, data = _trained_mlp()
    float_weight = model[0].weight.detach().clone()
    result = apply_adascale(model, data, num_iterations=60, bits=3, progress=False)
    assert [b.name for b in result.blocks] == ["0", "2", "4"]
    for block in result.blocks:
        assert block.loss_after < block.loss_before, block
    assert not torch.equal(model[0].weight, float_weight)  # W / (exp(s2) exp(s3)) folded in place
    assert set(result.scales) == {"0.weight", "2.weight", "4.weight"}
    seen = []
    model[0].register_forward_pre_hook(lambda m, a: seen.append(m.weight.detach()))
    model.eval()
    model(data[0][0])
    q = model[0].weight_fake_quant
    assert torch.equal(seen[-1], q(model[0].weight)) and not q.step.requires_grad
    levels = seen[-1] / q.step[:, None]
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= 4  # a 3-bit grid


def test_adascale_beats_round_to_nearest_on_the_output() -> None:
    model, data = _trained_mlp()
    with torch.no_grad():
        reference = [model(x) for x, _ in data]
    rtn, ada = MLP(16, (32, 32), 8), MLP(16, (32, 32), 8)
    rtn.load_state_dict(model.state_dict())
    ada.load_state_dict(model.state_dict())
    round_to_nearest(rtn, bits=3)
    apply_adascale(ada, data, num_iterations=400, bits=3, progress=False)
    with torch.no_grad():
        error = {name: sum(((m(x) - y) ** 2).mean().item() for (x, _), y in zip(data, reference)) for name, m in (("rtn", rtn), ("ada", ada))}
    assert error["ada"] < 0.7 * error["rtn"]


def test_unsupported_layers_stay_float_and_are_listed(caplog) -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.up = nn.ConvTranspose1d(8, 8, 2)
            self.fc = nn.Linear(8, 4)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.fc(self.up(self.embed(tokens).transpose(1, 2)).mean(-1))

    model = Mixed()
    embed_before = model.embed.weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        result = apply_adascale(model, [torch.randint(0, 10, (4, 5))], num_iterations=3, progress=False)
    assert result.left_float == ["embed", "up"] and "leaves these layers float" in caplog.text
    assert torch.equal(model.embed.weight, embed_before) and not hasattr(model.embed, "weight_fake_quant")


def test_errors() -> None:
    with pytest.raises(ValueError, match="no Linear / Conv1d / Conv2d layer"):
        apply_adascale(nn.Sequential(nn.ReLU()), [torch.randn(2, 2)], progress=False)
    with pytest.raises(ValueError, match="gave no batches"):
        apply_adascale(MLP(4, (4,), 2), [], progress=False)
    with pytest.raises(ValueError, match="bits must be an integer >= 2 and <= 8"):
        apply_adascale(MLP(4, (4,), 2), [torch.randn(2, 4)], bits=9)
    with pytest.raises(ValueError, match="fp_input_mix must be a number >= 0 and <= 1"):
        AdaScale(fp_input_mix=2)


def test_fp_input_mix_feeds_float_activations() -> None:
    model, data = _trained_mlp()
    result = apply_adascale(model, data, num_iterations=5, bits=4, fp_input_mix=1.0, progress=False)
    assert len(result.blocks) == 3


# ----------------------------------------------------------------------------- callback
def test_callback_post_training_with_validate() -> None:
    callback = AdaScale(bits=4, num_batches=2, num_iterations=10, progress=False)
    model = tiny_model()
    trainer = tiny_trainer(callbacks=[callback])
    trainer.validate(model, tiny_loader(seed=1), verbose=False)
    assert callback.done and [b.name for b in callback.result.blocks] == ["net.0", "net.2"]
    assert all(q.initialized.item() == 1 and not q.step.requires_grad for q in callback.quantizer.weight_quantizers().values())


def test_callback_at_fit_start_then_fine_tunes_on_the_frozen_grid() -> None:
    import lightning.pytorch as pl

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            if batch_idx == 0:
                self.steps = [q.step.detach().clone() for q in callback.quantizer.weight_quantizers().values()]
                self.weight = pl_module.net[0].weight.detach().clone()

    callback, probe = AdaScale(bits=4, num_batches=2, num_iterations=10, progress=False), Probe()
    model = tiny_model()
    tiny_trainer(max_epochs=1, callbacks=[callback, EMAFakeQuant(weights=False), probe]).fit(model, tiny_loader())
    after = [q.step.detach() for q in callback.quantizer.weight_quantizers().values()]
    assert callback.done and all(torch.equal(a, b) for a, b in zip(probe.steps, after))  # encodings frozen
    assert not torch.equal(model.net[0].weight, probe.weight)  # the weights fine-tuned on that grid
    with pytest.raises(ValueError, match="AdaScale quantizes the weights"):
        tiny_trainer(callbacks=[AdaScale(), DiffQ()]).fit(tiny_model(), tiny_loader())
