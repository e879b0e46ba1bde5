"""Number formats: bit for bit what torchao computes (the oracle, where a deployed model runs), and
the properties every registered format must have."""
from __future__ import annotations

import warnings

import pytest
import torch

from qat_lightning import fake_quantize, parse_format
from qat_lightning.formats import describe_formats, format_examples, register_format
from qat_lightning.formats.minifloat import ELEMENTS, round_to_element

NAMED = [
    "int2", "int4", "int8", "int8_asym", "int8_per_channel", "int4_per_channel", "int4_asym_per_channel", "int8_per_row",
    "int4_g32", "int4_g128", "int3_g16", "int4_asym_g32", "int8_per_token", "fp8_e4m3", "fp8_e5m2", "fp8_e4m3_per_row",
    "fp8_e5m2_per_row", "mxfp8", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "mxfp4_floor", "mxfp8_floor",
    "nvfp4", "distiller8_symmetric", "distiller4_symmetric_restricted_per_channel", "distiller8_asymmetric_unsigned",
    "distiller8_asymmetric_signed_per_channel",
]  # fmt: skip
EVERY = sorted(set(NAMED) | set(format_examples()))


def _data(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Values over five decades along the last dimension, exact halves (ties) and a zero here and there."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[-1])
    flat = x.view(-1)
    flat[::97] = 0.0
    flat[5::89] = torch.round(flat[5::89] * 2) / 2
    return x.to(dtype)


# ----------------------------------------------------------------------------- torchao, the oracle
def _torchao(spec: str, x: torch.Tensor) -> torch.Tensor:
    warnings.filterwarnings("ignore")
    ao = pytest.importorskip("torchao", reason="torchao is the oracle (dev extra)")  # noqa: F841
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    from torchao.quantization.granularity import PerRow, PerTensor
    from torchao.quantization.qat.fake_quantize_config import Float8FakeQuantizeConfig, IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import Float8FakeQuantizer, IntxFakeQuantizer
    from torchao.quantization.quant_primitives import MappingType, _fake_quantize_affine, choose_qparams_affine

    f = parse_format(spec)
    if f.family == "int":
        dtype = getattr(torch, f"int{f.bits}")
        if x.dim() == 2 and f.symmetric and f.granularity in ("group", "channel"):  # torchao's QAT module itself
            granularity = {"group": None, "channel": "per_channel"}[f.granularity]
            return IntxFakeQuantizer(IntxFakeQuantizeConfig(dtype, granularity, group_size=f.group_size or None))(x)
        if not f.symmetric and f.granularity == "row" and spec.endswith("per_token"):
            return IntxFakeQuantizer(IntxFakeQuantizeConfig(dtype, "per_token", is_symmetric=False))(x)
        shape = tuple(x.shape)
        block = {"group": (*[1] * (x.dim() - 1), f.group_size), "row": (*[1] * (x.dim() - 1), shape[-1]),
                 "channel": (1, *shape[1:]), "tensor": shape}[f.granularity]  # fmt: skip
        mapping = MappingType.SYMMETRIC if f.symmetric else MappingType.ASYMMETRIC
        scale, zero = choose_qparams_affine(x, mapping, block, torch.int8, f.q_min, f.q_max, scale_dtype=torch.float32,
                                            zero_point_dtype=torch.int32)  # fmt: skip
        return _fake_quantize_affine(x, block, scale, zero, torch.int32, f.q_min, f.q_max)
    if f.family == "fp8":
        return Float8FakeQuantizer(Float8FakeQuantizeConfig(f.dtype, PerRow() if f.per_row else PerTensor()))(x)
    if f.family == "mx":
        elements = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "e2m3": DTYPE_FP6_E2M3, "e3m2": DTYPE_FP6_E3M2,
                    "e2m1": torch.float4_e2m1fn_x2}  # fmt: skip
        mode = ScaleCalculationMode.RCEIL if f.scaling == "rceil" else ScaleCalculationMode.FLOOR
        return MXTensor.to_mx(x.contiguous(), elements[f.element_name], 32, mode).dequantize(x.dtype)
    if f.family == "nvfp4":
        return NVFP4Tensor.to_nvfp4(x.contiguous(), per_tensor_scale=per_tensor_amax_to_scale(x.abs().max())).dequantize(x.dtype)
    raise AssertionError(f"no oracle for {spec}")


ORACLE = [s for s in NAMED if not s.startswith("distiller")]


@pytest.mark.parametrize("shape", [(64, 256), (4, 8, 128)], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", ORACLE)
def test_every_format_equals_torchao_bit_for_bit(spec: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = _data(shape, dtype)
    if spec in ("fp8_e4m3_per_row", "fp8_e5m2_per_row"):
        x[0] = 0.0  # a row of zeros: torchao returns NaN there (0 / 0), ours zeros; compared apart below
    ours, reference = fake_quantize(x, spec), _torchao(spec, x)
    assert ours.dtype == reference.dtype == dtype
    if spec.startswith("fp8") and spec.endswith("per_row"):
        assert torch.isnan(reference[0]).all() and torch.equal(ours[0], torch.zeros_like(ours[0]))
        ours, reference = ours[1:], reference[1:]
    assert torch.equal(ours, reference), (ours - reference).abs().max()


@pytest.mark.parametrize("spec", ["int4_g32", "int8_per_channel", "int8_per_token", "int4_per_channel", "int2_g32"])
def test_gradients_equal_torchao_qat(spec: str) -> None:
    """The straight-through estimator of torchao's QAT modules: 1 inside the grid, 0 where the level
    was clipped (the maximum of a symmetric block rounds to 2^(B-1) and clips). torchao's gradient
    passes through ``* (1 / scale)`` and ``* scale``: equal to ours to those two roundings. (torchao's
    FP8 fake quantizer casts the gradient to FP8 on its way back through ``.to(float32)``; ours keeps
    its precision, so FP8 is checked by the gradient property below, not against torchao.)"""
    x = _data((32, 128), torch.float32)
    grad = torch.randn(32, 128)
    ours = x.clone().requires_grad_()
    fake_quantize(ours, spec).backward(grad)
    theirs = x.clone().requires_grad_()
    _torchao(spec, theirs).backward(grad)
    assert torch.equal(ours.grad == 0, theirs.grad == 0)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=3e-7, atol=0)
    if spec.startswith("int") and not spec.endswith("per_token"):
        assert (ours.grad == 0).any()  # the clipped maxima


def test_fp8_and_nvfp4_keep_blocks_of_zeros_zero() -> None:
    x = torch.zeros(4, 64)
    for spec in ("fp8_e4m3", "fp8_e5m2_per_row", "nvfp4", "mxfp4", "int8_per_token", "int4_g32"):
        assert torch.equal(fake_quantize(x, spec), x), spec


# ----------------------------------------------------------------------------- properties of every format
def _blocks(spec: str, x: torch.Tensor) -> torch.Tensor:
    f = parse_format(spec)
    if f.family == "distiller":
        return x.reshape(x.shape[0], -1) if f.per_channel else x.reshape(1, -1)
    return f.rows.view(x)


@pytest.mark.parametrize("spec", EVERY)
def test_requantizing_on_the_same_scales_changes_nothing(spec: str) -> None:
    f = parse_format(spec)
    x = _data((16, 256), torch.float32)
    scales = f.choose_scales(x)
    once, _ = f.quantize_dequantize(x, scales)
    twice, _ = f.quantize_dequantize(once, scales)
    assert torch.equal(once, twice)


@pytest.mark.parametrize("spec", EVERY)
def test_each_block_takes_at_most_the_formats_levels_and_stays_within_its_range(spec: str) -> None:
    f = parse_format(spec)
    x = _data((16, 256), torch.float32, seed=1)
    y = fake_quantize(x, spec)
    factor = _range_factor(spec)
    for row_x, row_y in zip(_blocks(spec, x), _blocks(spec, y)):
        assert torch.unique(row_y).numel() <= f.levels()
        assert (row_y.abs() <= row_x.abs().max() * factor * (1 + 2e-7)).all()  # the last rounding into float32


def _range_factor(spec: str) -> float:
    """How far past a block's largest magnitude its quantized values may reach: symmetric integers by
    2^(B-1) / (2^(B-1) - 1/2) (the most negative value rounds to level -2^(B-1)), asymmetric ones by half a step (the zero point is rounded: 1 / (2^B - 1) of the
    largest magnitude at most); Distiller's symmetric grid by 2^(B-1) / ((2^B - 1) / 2) (its top
    level); floats by half a spacing (2^-(m+1) relative, m mantissa bits of the element)."""
    f = parse_format(spec)
    if f.family == "int":
        return 2 ** (f.bits - 1) / (2 ** (f.bits - 1) - 0.5) if f.symmetric else 1 + 1 / (2**f.bits - 1)
    if f.family == "distiller":
        return 2 ** (f.bits - 1) / ((2**f.bits - 1) / 2) if f.mode == "symmetric" else 1 + 1 / (2**f.bits - 1)
    mantissa = {"fp8": lambda: 3 if f.element == "e4m3" else 2, "mx": lambda: f.element.mantissa_bits, "nvfp4": lambda: 1}[f.family]()
    return 1 + 2.0 ** -(mantissa + 1)


@pytest.mark.parametrize("spec", EVERY)
def test_gradient_is_one_on_the_grid_and_zero_where_clipped(spec: str) -> None:
    f = parse_format(spec)
    x = _data((16, 256), torch.float32, seed=2).requires_grad_()
    y = f.fake_quantize(x)
    y.backward(torch.ones_like(y))
    assert set(torch.unique(x.grad).tolist()) <= {0.0, 1.0}
    _, mask = f.quantize_dequantize(x.detach(), f.choose_scales(x.detach()))
    expected = torch.ones_like(x) if mask is None else mask.float()
    assert torch.equal(x.grad, expected)
    assert x.grad.mean() > 0.95  # clipping is the exception: block maxima at most


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("spec", EVERY)
def test_dtype_and_device_are_preserved(spec: str, dtype: torch.dtype) -> None:
    x = _data((8, 256), torch.float32, seed=3).clamp(-6e4, 6e4).to(dtype)
    y = fake_quantize(x, spec)
    assert y.dtype == dtype and y.device == x.device and y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("spec", EVERY)
def test_fake_quantize_compiles_without_graph_breaks(spec: str) -> None:
    torch._dynamo.reset()
    x = _data((8, 256), torch.float32, seed=4).requires_grad_()
    compiled = torch.compile(lambda t: fake_quantize(t, spec), backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    eager = fake_quantize(x2, spec)
    eager.sum().backward()
    assert torch.equal(y, eager) and torch.equal(x.grad, x2.grad)


def test_minifloat_rounding_is_to_nearest_even_over_every_value() -> None:
    """Every midpoint between two neighbours rounds to the one with the even mantissa; values past
    the largest saturate; the set of values is the format's."""
    for name in ("e2m1", "e2m3", "e3m2", "e4m3", "e5m2"):
        element = ELEMENTS[name]
        values = element.magnitudes()
        assert torch.equal(round_to_element(values, element), values)
        assert torch.equal(round_to_element(-values, element), -values)
        mids = (values[1:] + values[:-1]) / 2
        rounded = round_to_element(mids, element)
        lower_even = torch.arange(values.numel() - 1) % 2 == 0  # consecutive codes alternate parity
        assert torch.equal(rounded, torch.where(lower_even, values[:-1], values[1:])), name
        assert round_to_element(torch.tensor([element.max_value * 4]), element).item() == element.max_value
        assert element.levels() == 2 * values.numel() - 1


# ----------------------------------------------------------------------------- specs and sizes
@pytest.mark.parametrize(
    ("spec", "bits"),
    [("int4_g32", 5.0), ("int4_g128", 4.25), ("int8_per_channel", 8 + 32 / 256), ("mxfp4", 4.25), ("mxfp8", 8.25),
     ("mxfp6_e2m3", 6.25), ("nvfp4", 4.5 + 32 / (64 * 256)), ("fp8_e4m3", 8 + 32 / (64 * 256)), ("fp8_e4m3_per_row", 8 + 32 / 256),
     ("int4_asym_g32", 4 + 36 / 32), ("distiller8_symmetric_per_channel", 8 + 32 / 256)],
)  # fmt: skip
def test_bits_per_element_include_the_scales(spec: str, bits: float) -> None:
    assert parse_format(spec).bits_per_element((64, 256)) == pytest.approx(bits, rel=1e-12)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("int9", "2 to 8 bits"), ("int4_g1", "at least 2"), ("int8_asym_per_token", "asymmetric already"), ("mxfp5", "unknown number format"),
     ("fp8_e3m4", "unknown number format"), ("distiller8_symmetric_per_channel_ema", "per tensor"), (3, "spec string"),
     ("distiller20_symmetric", "2 to 16 bits")],
)  # fmt: skip
def test_bad_specs_are_refused_with_the_registered_patterns(spec: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        parse_format(spec)
    if "unknown" in message:
        assert "int4_g32" in str(error.value) and "mxfp4" in str(error.value)


def test_specs_are_case_insensitive_and_formats_pass_through() -> None:
    fmt = parse_format("INT4_G32")
    assert fmt is parse_format("int4_g32") and parse_format(fmt) is fmt and str(fmt) == "int4_g32"


def test_a_block_size_that_does_not_divide_the_last_dimension_is_named() -> None:
    with pytest.raises(ValueError, match=r"mxfp4: the last dimension \(48.*block size 32"):
        fake_quantize(torch.randn(4, 48), "mxfp4")
    with pytest.raises(ValueError, match=r"int4_g32: the last dimension"):
        fake_quantize(torch.randn(4, 48), "int4_g32")


def test_registering_a_format_is_one_call() -> None:
    from dataclasses import dataclass

    from qat_lightning.formats import IntFormat

    @dataclass(frozen=True)
    class Ternary(IntFormat):
        def levels(self) -> int:
            return 3

    from qat_lightning.formats import registry

    register_format(r"ternary_g(?P<n>\d+)", lambda s, m: Ternary(s, 2, "group", int(m["n"])), example="ternary_g8", doc="test only")
    try:
        assert isinstance(parse_format("ternary_g8"), Ternary) and "ternary_g8" in describe_formats()
        assert fake_quantize(torch.randn(2, 8), "ternary_g8").shape == (2, 8)
    finally:
        registry._REGISTRY.pop()
        registry._parse.cache_clear()
