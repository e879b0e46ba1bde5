"""DiffQ's small weights drawn together (``_draw_small_weights``): one autograd node for all of them,
the same values, noise and gradients, bit for bit, as drawing each alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning import DiffQuantizer
from qat_lightning.quantizers import diffq as diffq_module


class Mixed(nn.Module):
    """Small weights, one above the batch's size limit between them, a tied pair and a layer the
    forward skips (drawn with the batch, its output unused: no gradient for it nor its bits)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(24, 16)
        self.a = nn.Linear(16, 24)
        self.big = nn.Linear(24, 32)
        self.b = nn.Linear(32, 16)
        self.head = nn.Linear(16, 24, bias=False)
        self.head.weight = self.emb.weight  # tied: one quantized tensor, two slots
        self.unused = nn.Linear(16, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(self.emb(ids)))
        x = torch.relu(self.big(x))
        return self.head(self.b(x))


def _train(batched: bool, monkeypatch: pytest.MonkeyPatch, steps: int = 4, **options: object) -> list:
    monkeypatch.setattr(diffq_module, "BATCH_NUMEL", 600)  # self.big (768 entries) stays on its own
    model = Mixed()
    q = DiffQuantizer(model, min_size=0, exclude=["*bias"], **options)
    q.seed_noise(5)
    q.size_penalty = 0.7
    if not batched:  # each alone, in the order the batch draws: the small ones by registration, then the big one
        monkeypatch.setattr(q, "_small_weights", lambda: [])
        order = [qp for qp in q.quantized_params() if qp.name != "big.weight"] + [qp for qp in q.quantized_params() if qp.name == "big.weight"]

        def draw_in_order(module: nn.Module, args: tuple) -> None:  # runs after DiffQ's own hook (new_noise)
            for qp in order:
                q._noisy_weight(qp)

        model.register_forward_pre_hook(draw_in_order)
    optimizer = torch.optim.SGD([*model.parameters()], lr=0.5)
    ids = torch.randint(0, 24, (6, 5), generator=torch.Generator().manual_seed(1))
    record = []
    for _ in range(steps):
        optimizer.zero_grad()
        logits = model(ids)
        noisy = {qp.name: qp._noisy[0].detach().clone() for qp in q.quantized_params() if qp._noisy is not None}
        nodes = {qp.name: type(qp._noisy[0].grad_fn).__name__ for qp in q.quantized_params() if qp._noisy is not None}
        loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        loss.backward()
        grads = {name: (None if p.grad is None else p.grad.clone()) for name, p in model.named_parameters()}
        record.append((loss.item(), noisy, nodes, grads))
        optimizer.step()
    return record


def test_small_weights_drawn_together_equal_each_drawn_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    together, alone = _train(True, monkeypatch), _train(False, monkeypatch)
    nodes = together[0][2]
    assert {nodes[n] for n in ("emb.weight", "a.weight", "b.weight", "unused.weight")} == {"_InjectNoiseManyBackward"}
    assert nodes["big.weight"] == "_InjectNoiseBackward"  # above the batch's size limit: drawn alone
    assert set(alone[0][2].values()) == {"_InjectNoiseBackward"}
    for (loss, noisy, _, grads), (loss_, noisy_, _, grads_) in zip(together, alone):
        assert loss == loss_
        assert noisy.keys() == noisy_.keys()
        for name in noisy:
            assert torch.equal(noisy[name], noisy_[name]), name
        assert grads.keys() == grads_.keys()
        for name, grad in grads.items():
            if grad is None or grads_[name] is None:
                assert grad is None and grads_[name] is None, name
            else:
                assert torch.equal(grad, grads_[name]), name
    # the layer the forward skipped: no gradient for its weight nor its bits, as when drawn alone
    assert together[0][3]["unused.weight"] is None and together[0][3]["unused.weight_diffq"] is None


def test_drawn_together_matches_autograd_of_the_noisy_objective(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bits' gradient against autograd through the plain formula ``w + std(logit) * noise``."""
    monkeypatch.setattr(diffq_module, "BATCH_NUMEL", 2**16)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    q = DiffQuantizer(model, min_size=0, exclude=["*bias"])
    for logit in q.parameters():
        logit.data.normal_(0, 1)
    x = torch.randn(5, 8)
    q.seed_noise(11)
    out = model(x)
    assert {type(qp._noisy[0].grad_fn).__name__ for qp in q.quantized_params()} == {"_InjectNoiseManyBackward"}
    out.square().sum().backward()
    got = [qp.logit.grad.clone() for qp in q.quantized_params()]
    weights = [qp.param.detach() for qp in q.quantized_params()]
    q.seed_noise(11)  # the same draw again, by hand: the unit noise of every entry, tensor after tensor
    unit_noise, half = q._sampler.draw(torch.empty(sum(w.numel() for w in weights)), q._rng.generator(torch.device("cpu")))
    logits = [qp.logit.detach().clone().requires_grad_() for qp in q.quantized_params()]
    out, offset = x, 0
    for i, (layer, w, logit) in enumerate(zip([model[0], model[2]], weights, logits)):
        n = w.numel()
        noise = unit_noise[offset:offset + n].view(-1, 8)
        offset += n
        unit = 1 / (2 ** q.get_bits(logit) - 1)
        std = unit[:, None] * (w.max() - w.min()) * half
        out = F.linear(out, (w.view(-1, 8) + std * noise).view_as(w), layer.bias.detach())
        if i == 0:
            out = torch.tanh(out)
    expected = torch.autograd.grad(out.square().sum(), logits)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_what_is_not_drawn_together(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    shapes = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 6))  # 6 x 8: fine; 48 entries
    q = DiffQuantizer(shapes, min_size=0, exclude=["*bias"])
    assert [qp.name for qp in q._small_weights()] == ["0.weight", "1.weight", "2.weight"]
    assert DiffQuantizer(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)).double(), min_size=0)._small_weights() == []
    assert DiffQuantizer(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)), min_size=0, exclude=["*bias"], scale="channel")._small_weights() == []
    assert DiffQuantizer(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)), min_size=0, noise_sampler="torch")._small_weights() == []
    assert DiffQuantizer(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)), min_size=0, group_size=0)._small_weights() == []
