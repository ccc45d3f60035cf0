"""Throughput and size of sliced models against the dense model, measured side by side in one run.

    python benchmarks/sliced_speed.py --sliced outputs/smollm2-135m/slice_lr_25/model [more sliced model dirs ...]
        [--prefill 4x512] [--decode 64] [--repeats 5] [--out benchmarks/results/sliced_speed.json]
    python benchmarks/sliced_speed.py --dense RANDOM_7B_DIR --shapes 0.25,0.3 --prefill 4x2048 --decode 128

For the dense model (``--dense``, default the SmolLM2 demo) and every sliced model directory (a train/slice.py
``model/`` or a sliced + LoRA export), in the same process and with the same threads, on ``--device`` (the GPU
when there is one) in ``--dtype`` (bf16 on a GPU, float32 on CPU):

* parameters, with and without the vocabulary matrices (tied ones counted once), and the multiply-adds per
  token of all Linear layers (the head included): the speed-up a perfectly efficient kernel would give;
* prefill: tokens per second of a forward over a batch of windows (``--prefill BxT``), no cache;
* decode: tokens per second of greedy generation with the KV cache, batch 1, ``--decode`` new tokens after a
  32-token prompt.

``--shapes 0.25,...`` adds, for each fraction, a random-weight sliced model of the dense model's shape with every
layer at that width loss (rounded to a multiple of 64), built on the device without calibration: a speed figure
for a random-weight model of a real shape (the GPU kit's), where slicing's widths carry no information anyway.

The models are timed in turns (dense, sliced, dense, sliced, ...) ``--repeats`` times after a warm-up, and the
median of each is reported, so a noisy machine slows all of them alike; the ratios are sliced / dense.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dlp.rundir import atomic_write_json  # noqa: E402
from dlp.modeling import DEMO_MODEL, find_decoder_layers, load_model_and_tokenizer, resolve_dtype  # noqa: E402
from dlp.process import setup  # noqa: E402
from dlp.resources import synchronize  # noqa: E402
from dlp.sliced import sliced_classes  # noqa: E402
from dlp.slicing import parameter_count, sliced_config  # noqa: E402


def linear_macs_per_token(model) -> int:
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    synchronize(ids.device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    synchronize(ids.device)
    return time.perf_counter() - start


@torch.no_grad()
def decode_seconds(model, prompt: torch.Tensor, new_tokens: int) -> float:
    synchronize(prompt.device)
    start = time.perf_counter()
    out = model.generate(
        prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0
    )
    synchronize(prompt.device)
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return time.perf_counter() - start


def uniformly_sliced(dense, fraction: float, device: torch.device, dtype: torch.dtype, multiple: int = 64):
    """A random-weight sliced model of ``dense``'s shape, every layer ``fraction`` narrower, built on ``device``."""
    width = max(multiple, round(dense.config.hidden_size * (1 - fraction) / multiple) * multiple)
    config = sliced_config(dense.config, [width] * len(find_decoder_layers(dense)[1]))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the timed dtype: a float32 7B would not fit beside the dense
    try:
        with torch.device(device):
            model = sliced_classes(dense.config.model_type)["ForCausalLM"](config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", default=DEMO_MODEL)
    parser.add_argument("--sliced", nargs="*", default=[], help="sliced model directories")
    parser.add_argument("--shapes", default="", help="width losses of random-weight uniformly sliced models")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--prefill", default="4x512", help="batch x tokens of the prefill forward")
    parser.add_argument("--decode", type=int, default=64, help="new tokens generated (batch 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/sliced_speed.json")
    args = parser.parse_args()
    if not args.sliced and not args.shapes:
        parser.error("give sliced model directories (--sliced) or width losses (--shapes), or both")
    setup(0)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    batch, length = (int(v) for v in args.prefill.lower().split("x"))
    models = {"dense": load_model_and_tokenizer(args.dense, args.dtype)[0].to(device)}
    for path in args.sliced:
        models[str(path)] = load_model_and_tokenizer(path, args.dtype)[0].to(device)
    for fraction in filter(None, args.shapes.split(",")):
        models[f"uniformly sliced {float(fraction):.0%} (random weights)"] = uniformly_sliced(
            models["dense"], float(fraction), device, resolve_dtype(args.dtype)
        )
    vocab = models["dense"].config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    prompt = ids[:1, :32]
    prefill, decode = {name: [] for name in models}, {name: [] for name in models}
    for name, model in models.items():  # warm-up (allocator, kernels)
        prefill_seconds(model, ids[:1, :64])
        decode_seconds(model, prompt, 4)
    for repeat in range(args.repeats):
        for name, model in models.items():
            prefill[name].append(prefill_seconds(model, ids))
            decode[name].append(decode_seconds(model, prompt, args.decode))
        print(f"[bench] repeat {repeat + 1}/{args.repeats} done", flush=True)
    results = {}
    for name, model in models.items():
        results[name] = {
            "parameters": parameter_count(model),
            "parameters_without_embeddings": parameter_count(model, embeddings=False),
            "linear_macs_per_token": linear_macs_per_token(model),
            "widths": getattr(model.config, "sliced_attention_dims", None),
            "prefill_tokens_per_s": batch * length / statistics.median(prefill[name]),
            "decode_tokens_per_s": args.decode / statistics.median(decode[name]),
            "prefill_s": prefill[name],
            "decode_s": decode[name],
        }
    dense = results["dense"]
    for name, entry in results.items():
        entry["ratios"] = {
            key: entry[key] / dense[key]
            for key in (
                "parameters",
                "parameters_without_embeddings",
                "linear_macs_per_token",
                "prefill_tokens_per_s",
                "decode_tokens_per_s",
            )
        }
    report = {
        "dense": args.dense,
        "prefill": f"{batch}x{length}",
        "decode_new_tokens": args.decode,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "models": results,
    }
    atomic_write_json(args.out, report)
    print(f"{'model':<55} {'params':>12} {'w/o emb':>8} {'MACs':>7} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, entry in results.items():
        r = entry["ratios"]
        print(
            f"{name:<55} {entry['parameters']:>12,} {r['parameters_without_embeddings']:>7.3f}x "
            f"{r['linear_macs_per_token']:>6.3f}x "
            f"{entry['prefill_tokens_per_s']:>8.0f} ({r['prefill_tokens_per_s']:.2f}x) "
            f"{entry['decode_tokens_per_s']:>6.1f} ({r['decode_tokens_per_s']:.2f}x)"
        )
    print(f"[bench] written to {args.out}")


if __name__ == "__main__":
    main()
