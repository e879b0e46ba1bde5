"""After QAT, torchao's quantized inference (``convert_to_torchao``) against the float model:
forward latency and the serialized size of the weights, side by side in one process.

A random-init Hugging Face Llama (hidden 256, 4 layers, intermediate 688 rounded to 704, vocab
512; nothing downloaded), batch 8 x 128 tokens, every decoder Linear and the head converted (the
embedding stays float), one thread by default.

    python benchmarks/converted_inference.py [--threads 1] [--repeats 20]
"""
from __future__ import annotations

import argparse
import copy
import io
import logging
import statistics
import time
import warnings

import torch

from qat_lightning import EMAFakeQuantizer
from qat_lightning.export.inference import convert_to_torchao

SCHEMES = {
    "int4_g32 weights": dict(weight_format="int4_g32", activations=False),
    "int8_per_channel weights": dict(weight_format="int8_per_channel", activations=False),
    "int8_per_token + int4_g32": dict(weight_format="int4_g32", activation_format="int8_per_token", activation_position="inputs"),
}


def llama() -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def latency(model: torch.nn.Module, tokens: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats + 3):
            start = time.perf_counter()
            model(tokens)
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("torchao").setLevel(logging.ERROR)
    base = llama()
    tokens = torch.randint(0, 512, (8, 128), generator=torch.Generator().manual_seed(0))
    float_time, float_size = latency(base, tokens, args.repeats), size_mb(base)
    print(f"Llama 256 x 4 layers, batch 8 x 128 tokens, {args.threads} thread(s)")
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
