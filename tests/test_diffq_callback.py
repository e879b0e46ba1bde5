import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.testing import assert_close

from qat_lightning import DiffQ, DiffQuantizer

from .helpers import set_widths, tiny_loader, tiny_model, tiny_trainer

SMALL = dict(min_size=0, exclude=["*.bias"])  # quantize every weight of the tiny model


class Snapshots(pl.Callback):
    """Records weights at chosen hooks (placed before or after DiffQ in the callback list)."""

    def __init__(self) -> None:
        self.seen: dict[str, list[dict[str, torch.Tensor]]] = {}

    def _take(self, name: str, pl_module: pl.LightningModule) -> None:
        weights = {k: v.detach().clone() for k, v in pl_module.named_parameters() if not k.endswith("_diffq")}
        self.seen.setdefault(name, []).append(weights)

    def on_validation_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._take("validation_start", pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._take("validation_end", pl_module)

    def on_test_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._take("test_start", pl_module)


def test_fit_validates_on_true_quantized_weights_and_restores_float(tmp_path) -> None:
    before, after = Snapshots(), Snapshots()
    diffq = DiffQ(**SMALL)
    trainer = tiny_trainer(max_epochs=2, num_sanity_val_steps=1, callbacks=[before, diffq, after])
    model = tiny_model()
    trainer.fit(model, tiny_loader(), tiny_loader(seed=1))
    # sanity check + 2 epochs of validation, each on quantized weights, each restored exactly
    assert len(after.seen["validation_start"]) == 3
    for float_w, quant_w, restored in zip(
        before.seen["validation_start"], after.seen["validation_start"], after.seen["validation_end"]
    ):
        for name in float_w:
            assert torch.equal(restored[name], float_w[name]), name
        assert not torch.equal(quant_w["net.0.weight"], float_w["net.0.weight"])
    q = diffq.quantizer
    qp = q.quantized_params()[0]
    with q.quantized():
        assert torch.equal(qp.param, after.seen["validation_end"][-1]["net.0.weight"]) is False
        current = qp.param.detach().clone()
    assert torch.equal(q.quantized_weight(qp), current)
    assert not q.is_quantized


def test_test_and_predict_use_quantized_weights_unless_disabled() -> None:
    snap = Snapshots()
    diffq = DiffQ(**SMALL)
    trainer = tiny_trainer(callbacks=[diffq, snap])
    model = tiny_model()
    trainer.fit(model, tiny_loader())
    trainer.test(model, tiny_loader(), verbose=False)
    q = diffq.quantizer
    expected = q.quantized_weight(q.quantized_params()[0])
    assert torch.equal(snap.seen["test_start"][-1]["net.0.weight"], expected)
    preds = torch.cat(trainer.predict(model, tiny_loader()))
    with q.quantized():
        model.eval()
        direct = torch.cat([model(x).argmax(-1) for x, _ in tiny_loader()])
    assert torch.equal(preds, direct)
    diffq.quantize_eval = False
    trainer.test(model, tiny_loader(), verbose=False)
    assert torch.equal(snap.seen["test_start"][-1]["net.0.weight"], model.net[0].weight.detach())


def test_bits_get_their_own_param_group() -> None:
    diffq = DiffQ(bits_lr=0.02, bits_weight_decay=0.001, **SMALL)
    trainer = tiny_trainer(callbacks=[diffq])
    model = tiny_model(weight_decay=0.1)
    trainer.fit(model, tiny_loader())
    (optimizer,) = trainer.optimizers
    bits = {id(p) for p in diffq.quantizer.parameters()}
    assert not any(id(p) in bits for p in optimizer.param_groups[0]["params"])
    group = optimizer.param_groups[1]
    assert {id(p) for p in group["params"]} == bits
    assert group["lr"] == 0.02 and group["weight_decay"] == 0.001


# the scheduler, and the first group's lr when fit starts (what the bits group's bits_lr is scaled against)
SCHEDULERS = {
    "cosine": (lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8), 0.1),
    "onecycle": (lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=8), 0.5 / 25),
    "step": (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5), 0.1),
    # one lambda per group: the bits group needs its own entry (else zip(..., strict=True) fails)
    "lambda": (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step)), 0.1),
    "multiplicative": (lambda opt: torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda step: 0.8), 0.1),
    # base_lrs and max_lrs per group, momenta cycled per group
    "cyclic": (lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.02, max_lr=0.2, step_size_up=2), 0.02),
    # the schedulers inside hold their own base_lrs
    "sequential": (lambda opt: torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)], milestones=[2]), 0.05),  # fmt: skip
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_lr_schedulers_scale_the_bits_group(scheduler: str) -> None:
    build, start_lr = SCHEDULERS[scheduler]

    class Scheduled(type(tiny_model())):
        def configure_optimizers(self):  # noqa: ANN201
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": build(opt), "interval": "step"}}

    torch.manual_seed(0)
    model = Scheduled(tiny_model().net, num_classes=8)
    diffq = DiffQ(bits_lr=0.01, **SMALL)
    trainer = tiny_trainer(max_steps=5, callbacks=[diffq])
    trainer.fit(model, tiny_loader(n=128))
    groups = trainer.optimizers[0].param_groups
    assert groups[0]["lr"] != pytest.approx(start_lr)  # the schedule moved it
    # the bits group follows the same schedule, scaled so that it started at bits_lr
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.01 / start_lr, rel=1e-6)


def test_reduce_on_plateau_lowers_the_bits_group_too() -> None:
    """ReduceLROnPlateau keeps a floor per group: the bits group gets one, and is reduced alike."""

    class Plateau(type(tiny_model())):
        def configure_optimizers(self):  # noqa: ANN201
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            # mode="max" on a falling loss: every epoch after the first is a bad one
            # (a floor per group, given as a list: torch then refuses a group added later without one)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0, min_lr=[0.001])
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "train/loss"}}

    model = Plateau(tiny_model().net, num_classes=8)
    diffq = DiffQ(bits_lr=0.01, **SMALL)
    trainer = tiny_trainer(max_epochs=4, callbacks=[diffq])
    trainer.fit(model, tiny_loader(n=64))
    groups = trainer.optimizers[0].param_groups
    assert groups[0]["lr"] < 0.1 / 2
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.1, rel=1e-6)
    assert trainer.lr_scheduler_configs[0].scheduler.min_lrs == pytest.approx([0.001, 0.0001])


def _grads_at_first_step(diffq: DiffQ, trainer_kwargs: dict, batches: int) -> tuple:
    """Run one optimizer step; return (recorded bits grads, model state before, rng state, batches)."""

    class Recorder(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            if batch_idx == 0:
                self.state = copy.deepcopy(pl_module.state_dict())
                self.rng = diffq.quantizer.noise_rng_state()  # the callback's own noise generator

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
            if not hasattr(self, "grads"):
                self.grads = [p.grad.detach().clone() for p in diffq.quantizer.parameters()]

    recorder = Recorder()
    trainer = tiny_trainer(max_steps=1, callbacks=[diffq, recorder], **trainer_kwargs)
    trainer.fit(tiny_model(), tiny_loader(batch_size=8))
    data = list(tiny_loader(batch_size=8))[:batches]
    return recorder.grads, recorder.state, recorder.rng, data


@pytest.mark.parametrize(
    ("trainer_kwargs", "batches", "autocast"),
    [({}, 1, False), ({"accumulate_grad_batches": 2}, 2, False), ({"precision": "bf16-mixed"}, 1, True)],
    ids=["plain", "accumulate2", "bf16-mixed"],
)
def test_penalty_gradient_equals_autograd_of_the_full_objective(trainer_kwargs: dict, batches: int, autocast: bool) -> None:
    penalty = 3.0
    grads, state, rng, data = _grads_at_first_step(DiffQ(penalty=penalty, **SMALL), trainer_kwargs, batches)
    # by hand: same weights, same noise (same RNG state), loss = mean task loss + penalty * size
    model = tiny_model()
    quantizer = DiffQuantizer(model, **SMALL)
    model.load_state_dict(state)
    quantizer.set_noise_rng_state(rng)
    task = 0.0
    for x, y in data:
        quantizer.new_noise()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            task = task + F.cross_entropy(model(x), y) / batches
    objective = task + penalty * quantizer.model_size()
    expected = torch.autograd.grad(objective, quantizer.parameters())
    tolerance = dict(rtol=1e-2, atol=1e-6) if autocast else dict(rtol=1e-5, atol=1e-8)
    for got, want in zip(grads, expected):
        assert_close(got, want, **tolerance)
    size_grad = torch.autograd.grad(penalty * quantizer.model_size(), quantizer.parameters())
    assert any((g - s).abs().max() > 0 for g, s in zip(grads, size_grad))  # the task part is there too


def test_logs_size_bits_and_penalty(tmp_path) -> None:
    logger = CSVLogger(tmp_path, name="csv")
    diffq = DiffQ(penalty=2.0, **SMALL)
    trainer = tiny_trainer(max_epochs=2, logger=logger, log_every_n_steps=1, callbacks=[diffq])
    trainer.fit(tiny_model(), tiny_loader())
    metrics = trainer.logged_metrics
    for key in ("quant/model_size_mb", "quant/avg_bits", "quant/penalty", "quant/true_model_size_mb", "quant/compression"):
        assert key in metrics, key
    q = diffq.quantizer
    assert metrics["quant/true_model_size_mb"].item() == pytest.approx(q.true_model_size())
    assert metrics["quant/compression"].item() == pytest.approx(q.float_model_size() / q.true_model_size(), rel=1e-5)
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "quant/model_size_mb" in header and "quant/compression" in header


def test_penalty_shrinks_the_model() -> None:
    sizes, bits = {}, {}
    for penalty in (0.0, 1000.0):
        diffq = DiffQ(penalty=penalty, bits_lr=0.1, **SMALL)
        tiny_trainer(max_epochs=3, callbacks=[diffq]).fit(tiny_model(), tiny_loader())
        sizes[penalty] = diffq.quantizer.true_model_size()
        bits[penalty] = diffq.quantizer.average_bits(exact=True).item()
    assert sizes[1000.0] < 0.8 * sizes[0.0]
    assert bits[1000.0] < bits[0.0] - 2


def test_checkpoint_resume_restores_bits_weights_and_optimizer(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = DiffQ(bits_lr=0.05, **SMALL)
    tiny_trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[first, ckpt]).fit(tiny_model(), tiny_loader())
    path = tmp_path / "last.ckpt"
    saved = torch.load(path, weights_only=True)
    assert saved["callbacks"]["DiffQ"]["config"]["group_size"] == 8
    assert any(k.endswith("_diffq") for k in saved["state_dict"])

    class Check(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            for key, value in pl_module.state_dict().items():
                assert torch.equal(value, saved["state_dict"][key]), key
            opt_state = trainer.optimizers[0].state_dict()
            assert len(opt_state["param_groups"]) == 2
            assert opt_state["param_groups"][1]["lr"] == 0.05
            for index, state in saved["optimizer_states"][0]["state"].items():
                for name, value in state.items():
                    assert torch.equal(opt_state["state"][index][name], value), (index, name)
            self.checked = True

    check = Check()
    second = DiffQ(bits_lr=0.05, **SMALL)
    trainer = tiny_trainer(tmp_path, max_epochs=3, enable_checkpointing=True, callbacks=[second, check])
    trainer.fit(tiny_model(), tiny_loader(), ckpt_path=path)
    assert check.checked and trainer.current_epoch == 3


def test_quantize_on_fit_end_leaves_the_true_quantized_weights() -> None:
    class Floats(pl.Callback):
        def on_fit_end(self, trainer, pl_module) -> None:  # noqa: ANN001 - runs before DiffQ's on_fit_end
            self.floats = {k: v.detach().clone() for k, v in pl_module.named_parameters() if not k.endswith("_diffq")}

    floats = Floats()
    diffq = DiffQ(quantize_on_fit_end=True, **SMALL)
    model = tiny_model()
    tiny_trainer(callbacks=[floats, diffq]).fit(model, tiny_loader())
    q = diffq.quantizer
    assert q.is_quantized
    for qp in q.quantized_params():  # the parameters hold the quantization of the float weights...
        w = floats.floats[qp.name].reshape(qp.num_groups, qp.group_size)
        bits = q.true_bits(qp)[:, None]
        unit = 1 / (2**bits - 1)
        expected = (((w - w.min()) / (w.max() - w.min()) / unit).round() * unit * (w.max() - w.min()) + w.min()).view_as(qp.param)
        assert torch.equal(qp.param.detach(), expected), qp.name
        assert not torch.equal(qp.param.detach(), floats.floats[qp.name])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in floats.floats.items())  # ...the state dict the float ones
    q.restore()
    assert all(torch.equal(p.detach(), floats.floats[n]) for n, p in model.named_parameters() if n in floats.floats)


def test_trainer_test_alone_builds_the_quantizer_before_loading(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trained = DiffQ(**SMALL)
    model = tiny_model()
    trainer = tiny_trainer(tmp_path, enable_checkpointing=True, callbacks=[trained, ckpt])
    trainer.fit(model, tiny_loader())
    expected = trainer.test(model, tiny_loader(), verbose=False)[0]
    fresh = DiffQ(**SMALL)
    other = tiny_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)  # nothing of this model's own weights may survive the load
    results = tiny_trainer(callbacks=[fresh]).test(other, tiny_loader(), ckpt_path=tmp_path / "last.ckpt", verbose=False)
    assert results[0] == expected  # the checkpoint's quantized model, evaluated quantized
    for mine, theirs in zip(fresh.quantizer.parameters(), trained.quantizer.parameters()):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"penalty": -1.0}, "penalty must be a number >= 0"),
        ({"bits_lr": 0.0}, "bits_lr must be a number > 0"),
        ({"bits_weight_decay": -0.1}, "bits_weight_decay must be a number >= 0"),
        ({"quantize_eval": "yes"}, "quantize_eval must be True or False"),
        ({"quantize_on_fit_end": None}, "quantize_on_fit_end must be True or False"),
        ({"group_size": -8}, "group_size must be an integer >= 0"),
        ({"param": "sigmoid"}, "param must be one of 'bits', 'noise'"),
        ({"min_bits": 9}, "init_bits must be a number > 9"),
    ],
)
def test_callback_constructor_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DiffQ(**kwargs)


# ----------------------------------------------------------------------------- size budget (target_bits)
class StoredBits(pl.Callback):
    """Records, at each optimizer step, the stored bits per weight the step trained with."""

    def __init__(self, diffq: DiffQ) -> None:
        self.diffq, self.stored = diffq, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        self.stored.append(self.diffq.quantizer.stored_bits())


def _budget_run(steps: int = 40, **kwargs) -> tuple[DiffQ, StoredBits]:  # noqa: ANN003
    diffq = DiffQ(**{**dict(penalty=100.0, bits_lr=0.1, init_bits=8, min_bits=3, seed=0), **SMALL, **kwargs})
    record = StoredBits(diffq)
    tiny_trainer(max_steps=steps, max_epochs=-1, callbacks=[diffq, record]).fit(tiny_model(), tiny_loader(n=256))
    return diffq, record


@pytest.mark.parametrize("target", [4.5, 7.0])
def test_target_bits_brings_the_learned_bits_to_the_budget_when_they_freeze(target: float) -> None:
    free, free_record = _budget_run(straight_through_fraction=0.5)
    budget, record = _budget_run(straight_through_fraction=0.5, target_bits=target)
    assert record.stored[:20] == free_record.stored[:20]  # the noise phase: the penalty alone, as without a budget
    assert 5 < free_record.stored[19] < 6  # where the penalty had the bits when they froze (step 20 of 40)
    # from the freeze: at the budget (4.5: the bits came down; 7: up), within one group's width change
    assert all(target - 0.05 < s <= target for s in record.stored[20:]), (target, record.stored[19:])
    assert budget.quantizer.stored_bits() <= target
    # the penalty's allocation kept: the logits moved by one amount
    for mine, theirs in zip(budget.quantizer.parameters(), free.quantizer.parameters()):
        difference = (mine - theirs).detach()
        assert_close(difference, torch.full_like(difference, float(difference.mean())))


def test_target_bits_without_a_straight_through_phase_fits_at_the_end_of_fit() -> None:
    budget, record = _budget_run(target_bits=4.0)
    assert record.stored[-1] > 4.5  # learned to the last step...
    assert 3.95 < budget.quantizer.stored_bits() <= 4.0  # ...then brought to the budget: what test and export see


def test_fit_budget_is_the_largest_common_shift_then_a_fill() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 16, bias=False))
    q = DiffQuantizer(model, min_size=0, group_size=8, min_bits=3, init_bits=6)
    with torch.no_grad():
        for logit in q.parameters():
            logit.add_(torch.randn_like(logit))
    numel, fills = 64 * 32 + 32 * 16, []
    for target in (4.0, 8.0, 5.0):  # down from about 6, then up, then down again
        before = [logit.detach().clone() for logit in q.parameters()]
        widths_before = [q.true_bits(qp) for qp in q.quantized_params()]
        shift = q.fit_budget(target)
        assert q.stored_bits() <= target and (shift < 0) == (target < 6)
        filled = 0
        for a, b, qp in zip(before, q.parameters(), q.quantized_params()):
            moved = (b - a).detach()
            common = (moved - shift).abs() < 1e-5
            assert common.float().mean() > 0.7  # most logits moved by the one common amount...
            shifted = (q._size.extra_bits + q._bits.bits(a + shift)).round()  # ...the rest are the fill:
            width = q.true_bits(qp)
            assert torch.equal(width[~common], shifted[~common] + 1)  # one level more each,
            assert width.max() == shifted.max()  # never past the tensor's widest (no width grows)
            filled += int((~common).sum())
        # the fill leaves less than one group's worth: any further group would break the budget
        assert target - q.stored_bits() < 8 / numel, (target, q.stored_bits(), filled)
        fills.append(filled)
        assert any(not torch.equal(w, q.true_bits(qp)) for w, qp in zip(widths_before, q.quantized_params()))
    assert fills == [17, 0, 0]  # at 4 bits the shift alone fell 17 groups short (a width step); 8 and 5: exact
    with pytest.raises(ValueError, match=r"target_bits=3.0 is below the smallest size this grid stores"):
        q.fit_budget(3.0)


def test_logit_of_inverts_bits() -> None:
    from qat_lightning.quantizers.diffq_bits import BitsParameterization

    bits = torch.tensor([2.01, 3.5, 7.25, 14.99], dtype=torch.float64)
    for param in ("bits", "noise"):
        p = BitsParameterization(2, 15, param)
        assert_close(p.bits(p.logit_of(bits)), bits)
        assert p.logit_of(torch.tensor([6.0], dtype=torch.float64)).item() == pytest.approx(p.init_logit(6.0))


def test_target_bits_below_the_grid_is_refused_at_setup() -> None:
    diffq = DiffQ(target_bits=3.1, min_bits=3, **SMALL)  # ranges and headers add more than 0.1 bit here
    with pytest.raises(ValueError, match=r"target_bits=3.1\) is below the smallest size this grid stores: 3\.\d+ bits per weight "
                                         r"with every group at 3 bits"):  # fmt: skip
        tiny_trainer(max_steps=1, callbacks=[diffq]).fit(tiny_model(), tiny_loader())


def test_stored_bits_if_counts_payload_widths_and_ranges() -> None:
    """Hand count: Linear(32, 16) weight, groups of 8, one fp32 min and max per tensor."""
    layer = nn.Linear(32, 16, bias=False)
    q = DiffQuantizer(layer, min_size=0, group_size=8, min_bits=3)
    numel, groups, ranges = 512, 64, 64
    # at min_bits every width is 0 bits (one possible value); the ranges and the header are the rest
    header = q.stored_bits_if(3) * numel - 3 * numel
    assert ranges <= header < ranges + 64
    assert q.stored_bits_if(5) == pytest.approx((5 * numel + 2 * groups + header) / numel)  # widths 3..5: 2 bits each
    assert q.stored_bits_if(4) == pytest.approx((4 * numel + 1 * groups + header) / numel)
    set_widths(q, [5])
    assert q.stored_bits() == pytest.approx(q.stored_bits_if(5))


def test_target_bits_resume_is_exact(tmp_path) -> None:
    """The budget is decided from the bits alone: a run resumed after its second epoch ends where the
    whole run ends, bit for bit."""
    kwargs = dict(penalty=0.0, bits_lr=0.2, target_bits=5.0, seed=0, **SMALL)
    whole = DiffQ(**kwargs)
    tiny_trainer(max_epochs=4, callbacks=[whole]).fit(tiny_model(), tiny_loader(n=128))
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = DiffQ(**kwargs)
    tiny_trainer(tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[first, ckpt]).fit(tiny_model(), tiny_loader(n=128))
    second = DiffQ(**kwargs)
    tiny_trainer(tmp_path, max_epochs=4, callbacks=[second]).fit(tiny_model(), tiny_loader(n=128), ckpt_path=tmp_path / "last.ckpt")
    assert not torch.equal(first.quantizer.parameters()[0], whole.quantizer.parameters()[0])  # the bits moved after the pause
    for mine, theirs in zip(second.quantizer.parameters(), whole.quantizer.parameters()):
        assert torch.equal(mine, theirs)
    assert second.quantizer.stored_bits() <= 5.0
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]["DiffQ"]["target_bits"] == 5.0


@pytest.mark.parametrize(("option", "message"), [({"target_bits": 5.0}, r"target_bits=\.\.\.\) moves every bits logit by one amount found on the whole model"),
                                                 ({"learn_ranges": True, "straight_through_fraction": 0.5, "scale": "channel"},
                                                  r"learn_ranges=True\) starts the ranges from whole weights"),
                                                 ({"dampening": 1.0, "straight_through_fraction": 0.5}, r"dampening > 0\) reads each weight's whole grid")])  # fmt: skip
def test_fsdp2_refuses_what_needs_whole_tensors_every_step(option: dict, message: str) -> None:
    diffq = DiffQ(**SMALL, **option)
    trainer = tiny_trainer(max_steps=1, callbacks=[diffq])
    diffq.quantizer = DiffQuantizer(tiny_model(), **SMALL, **{k: v for k, v in option.items() if k in ("learn_ranges", "scale")})
    diffq.fsdp2 = True  # what setup sets under ModelParallelStrategy (tests/test_fsdp.py runs the real one)
    with pytest.raises(ValueError, match=message + ".*not under FSDP2 yet"):
        diffq.on_fit_start(trainer, tiny_model())
