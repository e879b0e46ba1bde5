"""GPU checks (skipped without CUDA): device placement, mixed precision, quantized eval on the GPU."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from qat_lightning import DiffQ, DiffQuantizer

from .helpers import tiny_loader, tiny_model, tiny_trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_true_quantization_on_gpu_equals_cpu() -> None:
    torch.manual_seed(0)
    cpu = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    gpu = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).cuda()
    gpu.load_state_dict(cpu.state_dict())
    q_cpu, q_gpu = DiffQuantizer(cpu, min_size=0), DiffQuantizer(gpu, min_size=0)
    for a, b in zip(q_cpu.parameters(), q_gpu.parameters()):
        values = 2 * torch.randn(a.shape)
        a.data.copy_(values)
        b.data.copy_(values.cuda())
    for a, b in zip(q_cpu.quantized_params(), q_gpu.quantized_params()):
        assert torch.equal(q_cpu.quantized_weight(a), q_gpu.quantized_weight(b).cpu())
    assert q_cpu.true_model_size() == q_gpu.true_model_size()
    assert_close(q_cpu.model_size(), q_gpu.model_size().cpu())
    gpu.train()
    gpu(torch.randn(8, 64, device="cuda")).sum().backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in q_gpu.parameters())


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "32-true"])
def test_fit_validate_test_on_gpu(precision: str) -> None:
    import lightning.pytorch as pl

    class OnDevice(pl.Callback):
        def on_validation_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            self.devices = {p.device.type for p in diffq.quantizer.parameters()}
            self.quantized = diffq.quantizer.is_quantized

    diffq, check = DiffQ(penalty=10.0, bits_lr=0.05, min_size=0, exclude=["*.bias"]), OnDevice()
    trainer = tiny_trainer(accelerator="gpu", precision=precision, max_epochs=3, num_sanity_val_steps=1, callbacks=[diffq, check])
    model = tiny_model()
    trainer.fit(model, tiny_loader(), tiny_loader(seed=1))
    q = diffq.quantizer
    assert check.devices == {"cuda"} and check.quantized
    assert q.average_bits().item() < 8.0  # the penalty moved the bits
    assert not q.is_quantized
    result = trainer.test(model, tiny_loader(), verbose=False)[0]
    assert 0.0 <= result["test/acc"] <= 1.0


def test_penalty_gradient_under_fp16_grad_scaler() -> None:
    """The recorded bits gradient is unscaled (Lightning unscales before on_before_optimizer_step)."""
    import copy

    import lightning.pytorch as pl

    diffq = DiffQ(penalty=3.0, min_size=0, exclude=["*.bias"])

    class Recorder(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            self.state, self.rng = copy.deepcopy(pl_module.state_dict()), diffq.quantizer.noise_rng_state()

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
            self.grads = [p.grad.detach().clone() for p in diffq.quantizer.parameters()]

    recorder = Recorder()
    tiny_trainer(accelerator="gpu", precision="16-mixed", max_steps=1, callbacks=[diffq, recorder]).fit(
        tiny_model(), tiny_loader(batch_size=8)
    )
    model = tiny_model().cuda()
    quantizer = DiffQuantizer(model, min_size=0, exclude=["*.bias"])
    model.load_state_dict(recorder.state)
    quantizer.set_noise_rng_state(recorder.rng)  # the callback's own noise generator
    x, y = next(iter(tiny_loader(batch_size=8)))
    with torch.autocast("cuda", dtype=torch.float16):
        task = F.cross_entropy(model(x.cuda()), y.cuda())
    expected = torch.autograd.grad(task + 3.0 * quantizer.model_size(), quantizer.parameters())
    for got, want in zip(recorder.grads, expected):
        assert_close(got, want, rtol=2e-2, atol=1e-5)


def test_ema_fake_quant_cuda_fused_path_agrees_with_cpu() -> None:
    from qat_lightning import EMAFakeQuant, FakeLinearQuantization

    cpu = FakeLinearQuantization(8, "asymmetric_unsigned", ema_decay=0.9)
    gpu = FakeLinearQuantization(8, "asymmetric_unsigned", ema_decay=0.9).cuda()
    x = torch.randn(64, 128)
    out_cpu, out_gpu = cpu(x), gpu(x.cuda())
    assert_close(gpu.tracked.cpu(), cpu.tracked)
    step = 1 / cpu.scale
    assert ((out_gpu.cpu() - out_cpu).abs() <= step * 1.001).all()
    ema = EMAFakeQuant(weight_bits=4, activation_bits=8)
    trainer = tiny_trainer(accelerator="gpu", max_epochs=2, callbacks=[ema])
    trainer.fit(tiny_model(), tiny_loader(), tiny_loader(seed=1))
    assert all(q.iter_count.item() == 8 for q in ema.quantizer.activation_quantizers().values())


@pytest.mark.parametrize("axis", [None, 0])
def test_learned_step_cuda_kernels_agree_with_the_cpu_op(axis) -> None:  # noqa: ANN001
    from qat_lightning.formats.lsq import learned_step_quantize

    x = torch.randn(32, 64) * 2
    step = torch.full((32,) if axis == 0 else (), 0.05)
    zero = torch.zeros_like(step)
    results = []
    for device in ("cpu", "cuda"):
        xd = x.to(device).requires_grad_()
        sd = step.to(device).requires_grad_()
        y = learned_step_quantize(xd, sd, zero.to(device), -8, 7, 0.1, axis)
        y.square().sum().backward()
        results.append((y.detach().cpu(), xd.grad.cpu(), sd.grad.cpu()))
    (y0, dx0, ds0), (y1, dx1, ds1) = results
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
    assert_close(ds1.reshape(-1), ds0.reshape(-1), rtol=1e-4, atol=1e-4)


def test_lsq_callback_trains_on_gpu() -> None:
    from qat_lightning import EMAFakeQuant

    ema = EMAFakeQuant(learned_step=True, quantize_bias=True)
    trainer = tiny_trainer(accelerator="gpu", max_epochs=2, callbacks=[ema])
    trainer.fit(tiny_model(), tiny_loader(), tiny_loader(seed=1))
    assert all(p.is_cuda for p in ema.quantizer.parameters())
    assert all(q.step_initialized.item() == 1 for q in ema.quantizer.activation_quantizers().values())
