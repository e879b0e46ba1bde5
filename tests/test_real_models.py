"""Model code no one here wrote (tests/real_models.py): coverage by layer kind, the coverage report,
tied weights, MultiheadAttention's out_proj, AdaScale on transformer blocks, and a matrix of every
callback on every model: trains, validates quantized, resumes, exports."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from qat_lightning import (  # noqa: E402
    AdaScale, DiffQ, DiffQuantizer, EMAFakeQuant, EMAFakeQuantizer, HistogramCalibration, Rescaling, RescalingCalibrator,
    apply_adascale, load_quantized, register_layer, round_to_nearest, save_quantized,
)  # fmt: skip
from qat_lightning.export.checkpoint import main as export_main  # noqa: E402
from qat_lightning.layers import _BY_CLASS, layer_weights  # noqa: E402

from .helpers import tiny_trainer  # noqa: E402
from .real_models import MODELS, build, loader, sample  # noqa: E402

warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _rows(report, kind="weight"):
    return {row.name: row for row in report.rows if row.kind == kind}


# ----------------------------------------------------------------------------- coverage by layer kind
@pytest.mark.parametrize("name", MODELS)
def test_fake_quant_covers_every_weight_of_every_model(name: str) -> None:
    model = build(name)
    quantizer = EMAFakeQuantizer(model).prepare()
    report = quantizer.coverage
    assert report.weight_share() == 1.0, report.table()
    # every matrix / kernel of the model is a quantized weight row, nothing else is
    matrices = {n for n, p in model.named_parameters() if p.dim() >= 2}
    listed = {part for row in report.weights() for part in row.name.split(" = ")}
    assert matrices <= listed
    out = model(sample(name))
    assert torch.isfinite(out).all()


def test_the_layer_kinds_that_used_to_stay_float() -> None:
    gpt2 = build("gpt2")
    rows = _rows(EMAFakeQuantizer(gpt2).prepare().coverage)
    assert rows["net.transformer.h.0.attn.c_attn.weight"].layer == "Conv1D (transformers)"
    assert rows["net.transformer.h.0.attn.c_attn.weight"].quantized
    # Conv1D stores (in, out): its per-channel scales run along axis 1
    assert gpt2.net.transformer.h[0].attn.c_attn.weight_fake_quant.axis == 1
    lstm = build("lstm")
    quantizer = EMAFakeQuantizer(lstm).prepare()
    assert {"net.lstm.weight_ih_l0", "net.lstm.weight_hh_l1"} <= set(quantizer.weight_quantizers())
    encoder = build("transformer_encoder")
    quantizer = EMAFakeQuantizer(encoder).prepare()
    assert {"net.encoder.layers.0.self_attn.in_proj_weight", "net.encoder.layers.0.self_attn.out_proj.weight"} <= set(quantizer.weight_quantizers())


class Scaled(nn.Linear):
    """A subclass of nn.Linear with its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_a_linear_subclass_has_its_weight_quantized() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Scaled(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    float_out = model(x)
    quantizer = EMAFakeQuantizer(model, weight_bits=2, activations=False).prepare()
    assert set(quantizer.weight_quantizers()) == {"0.weight", "2.weight"}
    assert not torch.allclose(model(x), float_out)  # 2-bit weights change the output


class LowRank(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.randn(64, 4))
        self.v = nn.Parameter(torch.randn(4, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.u @ self.v).t()


def test_an_unregistered_layer_is_named_in_a_warning_and_register_layer_quantizes_it() -> None:
    model = nn.Sequential(nn.Linear(64, 64), LowRank())
    with pytest.warns(UserWarning, match=r"stay float; the largest: 1\.u .*LowRank is not a registered layer kind"):
        report = EMAFakeQuantizer(model, activations=False).prepare().coverage
        report.warn()
    assert report.weight_share() == pytest.approx(64 * 64 / (64 * 64 + 2 * 256))
    register_layer(LowRank, {"u": 0, "v": 0})
    try:
        assert layer_weights(model[1]) == {"u": 0, "v": 0}
        quantizer = EMAFakeQuantizer(model, activations=False).prepare()
        assert quantizer.coverage.weight_share() == 1.0
        assert set(quantizer.weight_quantizers()) == {"0.weight", "1.u", "1.v"}
        quantizer.remove()
        assert not [n for n, _ in model.named_modules() if n.endswith("fake_quant")]
    finally:
        del _BY_CLASS[LowRank]


def test_include_and_exclude_by_module_and_parameter_name() -> None:
    model = build("llama")
    quantizer = EMAFakeQuantizer(model, include=["*mlp*"], activations=False).prepare()
    assert quantizer.weight_quantizers() and all(".mlp." in n for n in quantizer.weight_quantizers())
    quantizer.remove()
    quantizer = EMAFakeQuantizer(model, exclude=["*lm_head*"], activations=False).prepare()
    assert "net.lm_head.weight" not in quantizer.weight_quantizers()
    assert "excluded by '*lm_head*'" in _rows(quantizer.coverage)["net.lm_head.weight"].reason
    quantizer.remove()
    diffq = DiffQuantizer(model, min_size=0, include=["*self_attn*"])
    assert diffq.quantized_params() and all("self_attn" in qp.name for qp in diffq.quantized_params())


# ----------------------------------------------------------------------------- tied weights
def test_a_tied_tensor_is_excluded_by_any_of_its_names() -> None:
    model = build("gpt2")
    assert model.net.lm_head.weight is model.net.transformer.wte.weight
    diffq = DiffQuantizer(model, min_size=0, exclude=["*lm_head*"])
    assert "net.transformer.wte.weight" not in {qp.name for qp in diffq.quantized_params()}
    row = _rows(diffq.coverage())["net.transformer.wte.weight = net.lm_head.weight"]
    assert not row.quantized and "exclude" in row.reason
    diffq.detach()
    fq = EMAFakeQuantizer(model, exclude=["*lm_head*"], activations=False).prepare()
    assert "net.transformer.wte.weight" not in fq.weight_quantizers()
    fq.remove()
    fq = EMAFakeQuantizer(model, activations=False).prepare()  # tied and quantized: one quantizer, both uses swapped
    entry = next(e for e in fq._entries if e.name == "net.transformer.wte.weight")
    assert {s.qualified_name for s in entry.slots} == {"net.transformer.wte.weight", "net.lm_head.weight"}


def _rescaled(name: str) -> tuple[nn.Module, RescalingCalibrator, float]:
    """The model rescaled in float64, its calibrator, and the relative change of its function."""
    model = build(name).double()
    model.eval()
    x = sample(name)
    before = model(x)
    calibrator = RescalingCalibrator(model, inplace=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibrator(x)
        calibrator.rescale(alpha=0.5)
    return model, calibrator, ((model(x) - before).norm() / before.norm()).item()


def test_rescaling_keeps_the_float_function_of_a_tied_model_exactly() -> None:
    model, calibrator, change = _rescaled("gpt2")
    assert "net.lm_head" in calibrator.not_rescaled and "tied" in calibrator.not_rescaled["net.lm_head"]
    assert change < 1e-10
    assert model.net.lm_head.weight is model.net.transformer.wte.weight


def test_rescaling_a_transformer_encoder_keeps_its_float_function() -> None:
    _, calibrator, change = _rescaled("transformer_encoder")
    assert "read inside MultiheadAttention" in calibrator.not_rescaled["net.encoder.layers.0.self_attn.out_proj"]
    assert change < 1e-10
    report = calibrator.coverage()
    assert any(r.quantized for r in report.rows) and all(r.quantized or r.reason for r in report.rows)


def test_adascale_keeps_a_tied_weight_one_tensor_on_one_grid() -> None:
    model = build("gpt2")
    result = apply_adascale(model, loader("gpt2"), lambda m, b: m(b[0]), num_iterations=3, progress=False)
    assert model.net.lm_head.weight is model.net.transformer.wte.weight
    assert "tied" in result.round_to_nearest["net.lm_head.weight"]
    quantizer = result.quantizer.weight_quantizers()["net.lm_head.weight"]
    w = model.net.lm_head.weight
    assert torch.equal(quantizer(w), quantizer(quantizer(w)))  # the frozen grid holds it exactly


# ----------------------------------------------------------------------------- MultiheadAttention's out_proj
def test_diffq_noise_reaches_multihead_attention_out_proj() -> None:
    model = build("transformer_encoder")
    quantizer = DiffQuantizer(model, min_size=0)
    out_proj = model.net.encoder.layers[0].self_attn.out_proj
    x = sample("transformer_encoder")
    model.train()
    quantizer.seed_noise(0)
    loss = model(x).square().mean()
    loss.backward()  # size_penalty 0: a logit gradient comes from the task alone
    assert out_proj.weight_diffq.grad is not None and out_proj.weight_diffq.grad.abs().sum() > 0
    # and evaluation sees the true quantized out_proj weight
    model.eval()
    seen = {}
    def look(module: nn.Module, args: tuple) -> None:
        seen["w"] = module.out_proj.weight.detach().clone()

    handle = model.net.encoder.layers[0].self_attn.register_forward_pre_hook(look)
    with torch.no_grad():
        model(x)
    handle.remove()
    qp = next(q for q in quantizer.quantized_params() if q.name.endswith("layers.0.self_attn.out_proj.weight"))
    assert torch.equal(seen["w"], quantizer.quantized_weight(qp))


def test_multihead_attention_activations_are_quantized_and_calibrated() -> None:
    model = build("transformer_encoder")
    quantizer = EMAFakeQuantizer(model, activation_types=(nn.Linear,)).prepare()
    names = set(quantizer.activation_quantizers())
    assert "net.encoder.layers.0.self_attn.output_fake_quant" in names  # out_proj's output, on its reader
    model.train()
    model(sample("transformer_encoder"))
    fq = quantizer.activation_quantizers()["net.encoder.layers.0.self_attn.output_fake_quant"]
    assert bool(fq.initialized if hasattr(fq, "initialized") else fq.tracked_max.abs().sum() > 0)
    inputs = EMAFakeQuantizer(build("transformer_encoder"), activation_position="inputs").prepare()
    rows = _rows(inputs.coverage, "activation")
    assert rows["input of net.encoder.layers.0.self_attn"].quantized
    assert "fused forward of MultiheadAttention" in rows["input of net.encoder.layers.0.self_attn.out_proj"].reason


# ----------------------------------------------------------------------------- AdaScale on transformer blocks
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "transformer_encoder"])
def test_adascale_trains_transformer_blocks_and_beats_round_to_nearest(name: str) -> None:
    forward = lambda m, b: m(b[0])  # noqa: E731
    data = loader(name, n=16, batch_size=8)
    x = sample(name)
    model = build(name)
    model.eval()
    with torch.no_grad():
        reference = model(x)
    rtn = copy.deepcopy(model)
    round_to_nearest(rtn, bits=3)
    result = apply_adascale(model, data, forward, num_iterations=40, bits=3, progress=False)
    blocks = [b for b in result.blocks if "layer" in b.name or ".h." in b.name]
    assert len(blocks) == 2, [b.name for b in result.blocks]  # both decoder / encoder layers trained, no fallback
    assert all(b.loss_after < b.loss_before for b in blocks)
    assert not [k for k, v in result.round_to_nearest.items() if "block" in v]
    with torch.no_grad():
        error_rtn = (rtn(x) - reference).square().mean().item()
        error_ada = (model(x) - reference).square().mean().item()
    assert error_ada < error_rtn


def test_round_to_nearest_can_keep_the_lm_head_float() -> None:
    model = build("llama")
    head = model.net.lm_head.weight.detach().clone()
    quantizer = round_to_nearest(model, bits=4, exclude=["*lm_head*"])
    assert "net.lm_head.weight" not in quantizer.weight_quantizers()
    assert torch.equal(model.net.lm_head.weight, head)


# ----------------------------------------------------------------------------- every callback x every model
CALLBACKS = {
    "diffq": lambda: [DiffQ(min_size=0, group_size=1)],
    # the transformer recipe's grid: symmetric per-channel ranges, searched, learned in a straight-through second half
    "diffq_grid": lambda: [DiffQ(min_size=0, group_size=1, scale="channel", symmetric_ranges=True, range_search=2,
                                 straight_through_fraction=0.5, learn_ranges=True)],
    # the size budget: the bits learned to the end of fit, then shifted to 6 stored bits per weight (from about 11)
    "diffq_budget": lambda: [DiffQ(min_size=0, group_size=1, target_bits=6.0)],
    "fake_quant": lambda: [EMAFakeQuant()],
    "int4_int8": lambda: [EMAFakeQuant(weight_format="int4_g16", activation_format="int8_per_token", activation_position="inputs")],
    "lsq": lambda: [EMAFakeQuant(learned_step=True, weight_bits=4)],
    "adascale": lambda: [AdaScale(num_batches=2, num_iterations=3, progress=False)],
    "histogram": lambda: [EMAFakeQuant(), HistogramCalibration(num_batches=2)],
    "rescaling": lambda: [Rescaling(num_batches=2), EMAFakeQuant()],
}


@pytest.mark.parametrize("callback", CALLBACKS)
@pytest.mark.parametrize("name", MODELS)
def test_every_callback_trains_validates_resumes_and_exports_every_model(name: str, callback: str, tmp_path: Path) -> None:
    model = build(name)
    callbacks = CALLBACKS[callback]()
    trainer = tiny_trainer(tmp_path, max_steps=2, limit_val_batches=1, enable_checkpointing=True, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(name), loader(name))
    losses = trainer.callback_metrics
    assert torch.isfinite(losses["val_loss"]) and torch.isfinite(losses["train_loss"])
    report = callbacks[0].coverage
    assert report is not None and all(r.quantized or r.reason for r in report.rows)
    if getattr(callbacks[0], "target_bits", None) is not None:
        assert 5.5 < callbacks[0].quantizer.stored_bits() <= callbacks[0].target_bits
    checkpoint = next((tmp_path / "checkpoints").glob("*.ckpt")) if (tmp_path / "checkpoints").exists() else None
    checkpoint = checkpoint or next(tmp_path.rglob("*.ckpt"))
    # resume: one more step from the checkpoint, on a fresh model and fresh callbacks
    resumed = build(name, seed=1)
    trainer = tiny_trainer(tmp_path / "resume", max_steps=4, max_epochs=3, limit_val_batches=1, callbacks=CALLBACKS[callback]())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(resumed, loader(name), loader(name), ckpt_path=str(checkpoint))
    assert trainer.global_step == 4 and torch.isfinite(trainer.callback_metrics["val_loss"])
    if callback.startswith("diffq"):  # the packed file from the checkpoint, loaded into the bare network
        out = tmp_path / "model.packed.safetensors"
        assert export_main([str(checkpoint), str(out)]) == 0
        net = build(name, seed=2).net
        load_quantized(out, net, prefix="net.")
        state = resumed.state_dict()
        assert set(net.state_dict()) == {k.removeprefix("net.") for k in state if not k.endswith("_diffq")}


def test_a_batchnorm_model_packs_and_loads_every_buffer(tmp_path: Path) -> None:
    model = build("mobilenet")
    quantizer = DiffQuantizer(model, min_size=0, group_size=1)
    model.train()
    model(sample("mobilenet"))  # BatchNorm statistics and num_batches_tracked move
    path = tmp_path / "m.safetensors"
    save_quantized(quantizer, path)
    target = build("mobilenet", seed=3)
    load_quantized(path, target)
    for key, value in model.state_dict().items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(target.state_dict()[key], value), key
            assert target.state_dict()[key].dtype == value.dtype


# ----------------------------------------------------------------------------- plain models out of QAT
@pytest.mark.parametrize("callback", ["fake_quant", "diffq"])
def test_from_pretrained_gets_the_quantized_model(callback: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from qat_lightning.export import save_pretrained_quantized

    model = build("gpt2")
    if callback == "fake_quant":
        quantizer = EMAFakeQuantizer(model, weight_bits=4, activations=False).prepare()
    else:
        quantizer = DiffQuantizer(model, min_size=0, init_bits=4)
    x = sample("gpt2")
    model.eval()
    with torch.no_grad():
        quantized_out, float_out = model(x), None
        with _weights_off(quantizer):
            float_out = model(x)
    assert not torch.allclose(quantized_out, float_out, atol=1e-4)  # 4 bits: the two differ
    save_pretrained_quantized(quantizer, model.net, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "fake_quant" in k or k.endswith("_diffq")]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, quantized_out, rtol=0, atol=1e-5)


class _weights_off:
    def __init__(self, quantizer) -> None:
        self.quantizer = quantizer

    def __enter__(self) -> None:
        if isinstance(self.quantizer, DiffQuantizer):
            self.quantizer.enabled = False
        else:
            self.quantizer.weights_enabled = False

    def __exit__(self, *exc) -> None:
        if isinstance(self.quantizer, DiffQuantizer):
            self.quantizer.enabled = True
        else:
            self.quantizer.weights_enabled = True


def test_batchnorm_folding_keeps_the_eval_function_and_quantizes_the_folded_layers() -> None:
    from qat_lightning.quantizers.fold import fold_batchnorm

    for name in ("resnet", "mobilenet"):
        model = build(name).double()
        model.train()
        for _ in range(3):
            model(sample(name).double())  # running statistics away from (0, 1)
        model.eval()
        x = sample(name).double()
        before = model(x)
        pairs = fold_batchnorm(model)
        assert len(pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in build(name).modules())
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        torch.testing.assert_close(model(x), before, rtol=1e-10, atol=1e-12)
    model = build("resnet")
    quantizer = EMAFakeQuantizer(model, fold_batchnorm=True).prepare()
    assert ("net.stem.0", "net.stem.1") in quantizer.folded and quantizer.coverage.weight_share() == 1.0
    assert isinstance(model.net.stem[1], nn.Identity) and model.net.stem[0].bias is not None


# ----------------------------------------------------------------------------- ONNX from real models
def _per_channel_quantize_nodes(path: Path) -> int:
    """``QuantizeLinear`` nodes whose scale has more than one entry (a weight's channels)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    constants = {i.name: numpy_helper.to_array(i).size for i in graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t).size for n in graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})  # fmt: skip
    return sum(n.op_type == "QuantizeLinear" and constants.get(n.input[1], 1) > 1 for n in graph.node)


@pytest.mark.parametrize("name", MODELS)
def test_onnx_export_of_every_model_runs_in_onnx_runtime_like_pytorch(name: str, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from qat_lightning.export.onnx import export_onnx

    model = build(name)
    quantizer = EMAFakeQuantizer(model, weight_mode="symmetric_restricted", activation_mode="asymmetric_signed")
    quantizer.prepare()
    model.train()
    model(sample(name))  # activation ranges
    model.eval()
    x = sample(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(model, (x,), tmp_path / f"{name}.onnx", dynamic_batch=name != "llama")
    # every weight quantizer (LSTM's weight_ih_l0, MHA's in_proj_weight too) is a per-channel QDQ pair
    assert _per_channel_quantize_nodes(path) == len(quantizer.weight_quantizers())
    session = ort.InferenceSession(str(path))
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        reference = model(x)
    # QDQ rounds activations as the fused kernels do: a few output levels at most
    assert (out - reference).abs().max().item() < 0.02 * reference.abs().max().item() + 1e-6


@pytest.mark.parametrize("name", MODELS)
def test_diffq_onnx_export_of_every_model_holds_the_quantized_weights(name: str, tmp_path: Path) -> None:
    """Any input rank (3-D Linear inputs, whose transposed weight a constant folder would rename),
    tied weights (GPT-2's wte is its lm_head), LSTM and convolution weights: every DiffQ weight is
    stored as uint8 levels and ONNX Runtime computes what the quantized model computes."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    from qat_lightning.export.onnx import export_onnx

    model = build(name)
    quantizer = DiffQuantizer(model, min_size=0, max_bits=8, init_bits=3, group_size=0)
    model.eval()
    x = sample(name)
    with torch.no_grad():
        reference = model(x)  # eval: the true quantized weights
        quantizer.enabled = False
        float_out = model(x)
        quantizer.enabled = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(model, (x,), tmp_path / f"{name}.onnx", diffq=quantizer, dynamic_batch=name != "llama")
    levels = [i for i in onnx.load(str(path)).graph.initializer if i.name.endswith("::levels")]
    assert len(levels) == len(quantizer.quantized_params())
    session = ort.InferenceSession(str(path))
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    scale = reference.abs().max().item()
    assert (float_out - reference).abs().max().item() > 0.01 * scale  # 3 bits: the quantized model is another function
    assert (out - reference).abs().max().item() < 1e-4 * scale
