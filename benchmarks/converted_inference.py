"""After QAT, torchao's quantized inference (``convert_to_torchao``) against the float model:
forward latency and the serialized size of the weights, side by side in one process.

A random-init Hugging Face Llama (hidden 256, 4 layers, intermediate 688 rounded to 704, vocab
512; nothing downloaded), batch 8 x 128 tokens, every decoder Linear and the head converted (the
embedding stays float), one thread by default. ``--device cuda``: on a GPU (float32 and torchao's
tensors there; each forward timed between ``torch.cuda.synchronize`` calls).

    python benchmarks/converted_inference.py [--threads 1] [--repeats 20] [--device cpu]
"""
from __future__ import annotations

import argparse
import copy
import io
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.step_overhead import synchronize  # noqa: E402
from qat_lightning import EMAFakeQuantizer  # noqa: E402
from qat_lightning.export.inference import convert_to_torchao  # noqa: E402

SCHEMES = {
    "int4_g32 weights": dict(weight_format="int4_g32", activations=False),
    "int8_per_channel weights": dict(weight_format="int8_per_channel", activations=False),
    "int8_per_token + int4_g32": dict(weight_format="int4_g32", activation_format="int8_per_token", activation_position="inputs"),
}


def llama(hidden: int = 256, layers: int = 4) -> torch.nn.Module:
    """Random-init Llama: ``hidden`` wide (heads of 64), MLP ``2.75 * hidden`` rounded up to 64."""
    import transformers

    heads = max(hidden // 64, 1)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=-(-11 * hidden // 4 // 64) * 64,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=max(heads // 2, 1), vocab_size=512, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def latency(model: torch.nn.Module, tokens: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats + 3):
            synchronize(str(tokens.device))
            start = time.perf_counter()
            model(tokens)
            synchronize(str(tokens.device))
            times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def size_mb(model: torch.nn.Module) -> float:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("torchao").setLevel(logging.ERROR)
    base = llama(args.hidden, args.layers).to(args.device)
    tokens = torch.randint(0, 512, (8, 128), generator=torch.Generator().manual_seed(0)).to(args.device)
    float_time, float_size = latency(base, tokens, args.repeats), size_mb(base)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{args.threads} thread(s)"
    print(f"Llama {args.hidden} x {args.layers} layers, batch 8 x 128 tokens, {where}")
    print(f"  {'float32':28s} {1e3 * float_time:8.2f} ms  {float_size:7.2f} MB")
    for name, options in SCHEMES.items():
        model = copy.deepcopy(base)
        quantizer = EMAFakeQuantizer(model, exclude=["*embed_tokens*"], **options)
        quantizer.prepare()
        with torch.no_grad():
            fake_quant = model(tokens).logits
        convert_to_torchao(quantizer)
        with torch.no_grad():
            error = (model(tokens).logits - fake_quant).abs().max().item()
        t, s = latency(model, tokens, args.repeats), size_mb(model)
        print(f"  {name:28s} {1e3 * t:8.2f} ms  {s:7.2f} MB   latency {t / float_time:.2f}x  size {s / float_size:.2f}x  "
              f"max |converted - fake quant| {error:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
