"""ONNX export of fake-quantized models as QuantizeLinear / DequantizeLinear (QDQ) pairs.

During the export every fake quantizer of an :class:`EMAFakeQuantizer`-prepared model is switched,
for this one trace, to torch's ``fake_quantize_per_tensor_affine`` / ``..._per_channel_affine`` with
its frozen parameters as constants; torch's ONNX exporter turns those into QDQ pairs that ONNX
Runtime (and TensorRT, OpenVINO, ...) read as int8 / uint8 quantization. Needs ``onnx`` (optional
extra ``qat-lightning[onnx]``).

QDQ holds 8-bit grids only: 8-bit activations and weights in the modes ``asymmetric_unsigned``,
``asymmetric_signed`` or ``symmetric_restricted`` (Distiller's plain ``symmetric`` mode has 257
levels, ``n = 127.5``), or LSQ step sizes. Anything else is refused with the reason. A grid
narrower than its ONNX type (``symmetric_restricted``: ``[-127, 127]`` in int8) is preceded by a
``Clip`` to its ends, so values beyond the trained range get the levels they get in training. A
graph whose biases an int8 runtime cannot hold on its int32 grid is refused
(:func:`check_int32_biases`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..quantizers.diffq import DiffQuantizer
from ..quantizers.factory import FormatQuantizer
from ..quantizers.fake_quantizer import WEIGHT_SUFFIX
from ..formats.uniform import cell_size, per_cell
from ..quantizers._common import _MIN_STEP
from ..quantizers.activation import FakeLinearQuantization
from ..quantizers.weight import LearnedStepWeight, WeightRange
from ..formats.distiller import LinearQuantMode, channel_min_max, linear_quant_params

ONNX_RANGES = {LinearQuantMode.ASYMMETRIC_UNSIGNED: (0, 255), LinearQuantMode.ASYMMETRIC_SIGNED: (-128, 127),
               LinearQuantMode.SYMMETRIC_RESTRICTED: (-127, 127)}  # fmt: skip
INT32_MAX = 2**31 - 1


def _check(name: str, num_bits: int, mode: LinearQuantMode) -> tuple[int, int]:
    if num_bits != 8:
        raise ValueError(f"ONNX QDQ export needs 8-bit quantizers; {name} has num_bits={num_bits}")
    if mode not in ONNX_RANGES:
        raise ValueError(
            f"ONNX QDQ export: {name} uses mode {mode.value!r}, whose 257 levels (Distiller's n = 127.5) do not fit "
            f"int8; train with 'symmetric_restricted', 'asymmetric_signed' or 'asymmetric_unsigned'"
        )
    return ONNX_RANGES[mode]


def _int8(levels: tuple[int, int]) -> tuple[int, int]:
    """The range of the ONNX type that holds ``levels``: int8 ``[-128, 127]`` for a signed grid."""
    return (0, 255) if levels[0] >= 0 else (-128, 127)


def _clipped_qdq(
    scale: float | torch.Tensor, zero: int | torch.Tensor, levels: tuple[int, int], axis: int | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """QDQ over the integer grid ``levels`` (torch's convention ``q = round(x / scale) + zero``).

    ONNX's ``QuantizeLinear`` saturates to the whole int8 / uint8 range. Where the grid is narrower
    (``symmetric_restricted``: ``[-127, 127]``) a ``Clip`` to the grid's ends comes first, so a value
    beyond them gets level -127 as in training, not -128."""
    q_min, q_max = levels
    onnx_min, onnx_max = _int8(levels)
    if axis is None:
        scale, zero = float(scale), int(zero)
        clip = None if (onnx_min, onnx_max) == levels else ((q_min - zero) * scale, (q_max - zero) * scale)

        def per_tensor(x: torch.Tensor) -> torch.Tensor:
            if clip is not None:
                x = torch.clamp(x, *clip)
            return torch.fake_quantize_per_tensor_affine(x, scale, zero, onnx_min, onnx_max)

        return per_tensor
    scale, zero = scale.reshape(-1).float(), zero.reshape(-1).to(torch.int32)

    def per_channel(w: torch.Tensor) -> torch.Tensor:
        if (onnx_min, onnx_max) != levels:
            shape = [1] * w.dim()
            shape[axis] = -1
            low, high = ((q - zero.float()) * scale for q in (q_min, q_max))
            w = torch.clamp(w, low.reshape(shape).to(w.dtype), high.reshape(shape).to(w.dtype))
        return torch.fake_quantize_per_channel_affine(w, scale, zero, axis, onnx_min, onnx_max)

    return per_channel


def _activation_forward(name: str, fq: FakeLinearQuantization) -> Callable[[torch.Tensor], torch.Tensor]:
    if not fq.enabled:
        return lambda x: x
    if fq.learned_step and fq.step_initialized.item() == 1:
        if fq.num_bits != 8:
            raise ValueError(f"ONNX QDQ export needs 8-bit quantizers; {name} has num_bits={fq.num_bits}")
        levels = fq.lsq_range
        scale, zero = max(float(fq.step.detach()), _MIN_STEP), int(round(-float(fq.zero_point)))  # as the forward clamps it
    else:
        if not fq.has_range:
            raise ValueError(f"ONNX QDQ export: {name} has no range yet; train or calibrate before exporting")
        levels = _check(name, fq.num_bits, fq.mode)
        scale, zero = 1 / float(fq.scale), int(round(-float(fq.zero_point)))
    return _clipped_qdq(scale, zero, levels, None)


def _weight_forward(name: str, quantizer: nn.Module, weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    if not quantizer.enabled:
        return lambda w: w
    axis = quantizer.axis
    with torch.no_grad():
        if isinstance(quantizer, LearnedStepWeight) and quantizer._has_state():
            if quantizer.num_bits != 8:
                raise ValueError(f"ONNX QDQ export needs 8-bit quantizers; {name} has num_bits={quantizer.num_bits}")
            levels, zero = quantizer.lsq_range, quantizer.zero.detach()
            step = quantizer.step.detach().float().clamp(min=_MIN_STEP)  # as the forward clamps it
        else:
            levels = _check(name, quantizer.num_bits, quantizer.mode)
            if isinstance(quantizer, WeightRange):  # clip ratio 1 until calibrated: the current range
                scale, zero_point, _, _ = quantizer.quant_params(weight)
            else:  # an LSQ weight not trained yet quantizes over its current range
                mn, mx = channel_min_max(weight, axis)
                scale, zero_point, _, _ = linear_quant_params(quantizer.num_bits, quantizer.mode, mn.float(), mx.float())
            step, zero = 1 / scale, -zero_point
        step, zero = step.clone(), zero.round().to(torch.int32)
    return _clipped_qdq(step, zero, levels, axis)


@contextlib.contextmanager
def qdq_mode(model: nn.Module) -> Iterator[None]:
    """Inside: every fake quantizer of ``model`` runs torch's fused fake-quant ops with constant,
    ONNX-legal parameters (what the exporter turns into QDQ pairs). Restored on exit."""
    unexportable = [name for name, m in model.named_modules() if isinstance(m, FormatQuantizer)]
    if unexportable:
        raise ValueError(
            f"ONNX QDQ export holds the 8-bit Distiller / LSQ grids of EMAFakeQuant; {unexportable[:3]} use number formats "
            f"({model.get_submodule(unexportable[0]).format.spec}, ...) with scales computed from each tensor, which QDQ's "
            "static scales cannot express: deploy those with their runtime (torchao)"
        )
    replaced: list[nn.Module] = []
    try:
        for name, module in model.named_modules():
            if isinstance(module, FakeLinearQuantization):
                module.forward = _activation_forward(name, module)
                replaced.append(module)
            for child_name, quantizer in module._modules.items():  # weight_fake_quant, weight_ih_l0_fake_quant, ...
                attr = child_name.removesuffix(WEIGHT_SUFFIX)
                if isinstance(quantizer, (WeightRange, LearnedStepWeight)) and attr in module._parameters:
                    quantizer.forward = _weight_forward(f"{name}.{attr}" if name else attr, quantizer, module._parameters[attr])
                    replaced.append(quantizer)
        yield
    finally:
        for module in replaced:
            del module.forward  # back to the class's forward


def export_onnx(
    model: nn.Module,
    args: tuple[Any, ...] | torch.Tensor,
    path: str | Path,
    *,
    diffq: DiffQuantizer | None = None,
    opset: int = 17,
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("output",),
    dynamic_batch: bool = True,
    exporter: str = "auto",
) -> Path:
    """Export ``model`` (in eval mode, fake quantizers as QDQ pairs) to ``path``; returns the path.

    ``args`` are example inputs for the trace. With ``dynamic_batch`` the first dimension of every
    input and output is left free. With ``diffq`` (its weights at 8 bits or fewer), every weight
    it quantizes is stored as uint8 levels with one scale per group, dequantized in the graph by
    ``DequantizeLinear`` (per group) + ``Reshape`` + ``Add(min)``: DiffQ's
    ``min + level · (max - min) / (2^b - 1)`` exactly, at one byte per weight.

    ``exporter``: ``"legacy"`` (TorchScript tracing), ``"dynamo"`` (``torch.export``; needs
    ``onnxscript``: Hugging Face decoders whose mask code or grouped-query attention the legacy
    exporter cannot convert), or ``"auto"``: legacy, and dynamo where legacy fails."""
    if diffq is not None:
        _check_diffq(diffq)
    try:
        import onnx  # noqa: F401 - torch's exporter needs it
    except ImportError as error:
        raise ImportError("export_onnx needs the onnx package: pip install 'qat-lightning[onnx]'") from error
    args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    training = model.training
    model.eval()
    axes = {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None
    enabled = diffq.enabled if diffq is not None else None
    try:
        if diffq is not None:
            diffq.enabled = False  # float weights in the trace, named as parameters; replaced below
        with qdq_mode(model), torch.no_grad():
            # DiffQ's weights are found by name below: no constant folding, which would merge a weight with
            # its transpose (any Linear whose input is not 2-D) into an anonymous initializer
            _export(model, args, path, exporter, opset, list(input_names), list(output_names), axes, fold=diffq is None)
    finally:
        model.train(training)
        if diffq is not None:
            diffq.enabled = enabled
    if diffq is not None:
        _store_diffq_weights(path, diffq)
    check_int32_biases(path)
    return path


EXPORTERS = ("auto", "legacy", "dynamo")


def _export(model: nn.Module, args: tuple, path: Path, exporter: str, opset: int, inputs: list[str], outputs: list[str],
            axes: dict | None, fold: bool = True) -> None:  # fmt: skip
    """``auto``: torch.export first (a failed legacy trace can leave Hugging Face models unexportable
    by torch.export in the same process), the legacy tracer where torch.export fails (the fast
    path of ``nn.MultiheadAttention``)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {list(EXPORTERS)}; got {exporter!r}")
    dynamo_error: Exception | None = None
    if exporter in ("auto", "dynamo"):
        try:
            _export_dynamo(model, args, path, opset, inputs, outputs, axes, fold)
            return
        except ImportError:
            if exporter == "dynamo":
                raise
        except Exception as error:  # noqa: BLE001 - auto: the legacy tracer next
            if exporter == "dynamo":
                raise
            dynamo_error = error
    try:
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset, input_names=inputs,
                          output_names=outputs, dynamic_axes=axes, do_constant_folding=fold)  # fmt: skip
    except Exception as error:
        if dynamo_error is None:
            raise
        hint = " (Hugging Face decoders: their mask code fixes the batch size under torch.export; pass dynamic_batch=False)" if axes else ""
        raise RuntimeError(f"export_onnx: both exporters failed{hint}. torch.export: {type(dynamo_error).__name__}: "
                           f"{str(dynamo_error)[:300]}; legacy: {type(error).__name__}: {str(error)[:300]}") from error  # fmt: skip


def _export_dynamo(model: nn.Module, args: tuple, path: Path, opset: int, inputs: list[str], outputs: list[str],
                   axes: dict | None, fold: bool = True) -> None:  # fmt: skip
    try:
        import onnxscript  # noqa: F401 - torch.export's ONNX translation
    except ImportError as error:
        raise ImportError("export_onnx(exporter='dynamo') needs onnxscript: pip install 'qat-lightning[onnx]'") from error
    options = dict(dynamo=True, opset_version=max(opset, 18), input_names=inputs, output_names=outputs, report=False, verbose=False,
                   optimize=fold)
    torch.onnx.export(model, args, str(path), dynamic_axes=axes, **options)


def check_int32_biases(path: str | Path) -> None:
    """Refuse a graph whose biases an int8 runtime cannot hold.

    ONNX Runtime (and TensorRT, OpenVINO) run a ``Gemm`` / ``Conv`` between a dequantized input and
    a dequantized weight as an integer product, with the float bias quantized to int32 at
    ``input_scale * weight_scale`` per output channel. Where ``|bias| / (input_scale *
    weight_scale)`` exceeds the int32 range the runtime saturates it and computes another
    function, silently (a weight step that collapsed to its floor in training does that). Raises
    ``ValueError`` naming the bias, the channel and the scales."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producers = {out: node for node in graph.node for out in node.output}

    def dequantize_scale(name: str) -> np.ndarray | None:
        node = producers.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in constants:
            return None
        return constants[node.input[1]].astype(np.float64)

    for node in graph.node:
        if node.op_type not in ("Gemm", "Conv") or len(node.input) < 3 or node.input[2] not in constants:
            continue
        input_scale, weight_scale = dequantize_scale(node.input[0]), dequantize_scale(node.input[1])
        if input_scale is None or weight_scale is None or input_scale.size != 1:
            continue
        bias = constants[node.input[2]].astype(np.float64)
        ratio = np.abs(bias) / (float(input_scale) * np.broadcast_to(weight_scale.reshape(-1), bias.shape))
        if np.all(ratio <= INT32_MAX):
            continue
        channel = int(np.argmax(ratio))
        raise ValueError(
            f"ONNX export: bias {node.input[2]!r} of {node.name or node.op_type} (output channel {channel}) does not fit "
            f"the int32 grid an int8 runtime quantizes it to: |bias| / (input scale x weight scale) = {ratio[channel]:.3g} "
            f"> 2^31 - 1 (bias {bias[channel]:.4g}, input scale {float(input_scale):.4g}, weight scale "
            f"{np.broadcast_to(weight_scale.reshape(-1), bias.shape)[channel]:.4g}); ONNX Runtime would saturate it. A weight "
            "scale that small is a learned step that collapsed to its floor in training: lower step_lr and retrain"
        )


def _check_diffq(diffq: DiffQuantizer) -> None:
    for qp in diffq.quantized_params():
        widest = int(diffq.true_bits(qp).max())
        if widest > 8:
            raise ValueError(f"ONNX export of DiffQ weights needs at most 8 bits per group; {qp.name!r} has groups of {widest} bits (train with max_bits=8)")


def _store_diffq_weights(path: Path, diffq: DiffQuantizer) -> None:
    """Replace each DiffQ weight initializer by uint8 levels + DequantizeLinear (axis 0: a scale per
    cell of entries sharing a width and a range) + the cell's min, reshaped to the weight."""
    import onnx
    from onnx import helper, numpy_helper

    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes = []
    for qp in diffq.quantized_params():
        names = [slot.qualified_name for slot in qp.slots if slot.qualified_name in initializers]  # a tied tensor: any name
        if not names:
            raise ValueError(f"ONNX export: weight {qp.name!r} is not an initializer of the exported graph (folded into another op?)")
        name = names[0]
        p = qp.param.detach().cpu()
        bits = diffq.true_bits(qp).cpu()
        levels, mn, mx = diffq.grid_levels(qp, p, bits.to(p.dtype))
        # one scale and one offset per cell (the finer of the bit groups and the range blocks), formed
        # as grid_dequantize forms them; the reference grid: one min for the whole tensor
        cell = cell_size(qp.group_size, qp.range_block)
        span = (mx.double() - mn.double()).float()
        scale = per_cell(1 / (2 ** bits.float() - 1), qp.group_size, cell) * per_cell(span, qp.range_block, cell)
        offset = per_cell(mn.float(), qp.range_block, cell)[:, None]
        prefix = f"{name}::"
        graph.initializer.remove(initializers[name])
        graph.initializer.extend([
            numpy_helper.from_array(levels.reshape(-1, cell).to(torch.uint8).numpy(), prefix + "levels"),
            numpy_helper.from_array(scale.numpy(), prefix + "scale"),
            numpy_helper.from_array(torch.zeros(scale.numel(), dtype=torch.uint8).numpy(), prefix + "zero"),
            numpy_helper.from_array(torch.tensor(list(p.shape), dtype=torch.int64).numpy(), prefix + "shape"),
            numpy_helper.from_array(offset.numpy(), prefix + "min"),
        ])  # fmt: skip
        nodes += [
            helper.make_node("DequantizeLinear", [prefix + "levels", prefix + "scale", prefix + "zero"], [prefix + "dq"], axis=0),
            helper.make_node("Add", [prefix + "dq", prefix + "min"], [prefix + "shifted"]),
            helper.make_node("Reshape", [prefix + "shifted", prefix + "shape"], [name]),
        ]
    for node in reversed(nodes):
        graph.node.insert(0, node)
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(path))
