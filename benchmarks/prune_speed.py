"""Wall time and peak memory of DLP + Wanda (70%) pruning: dlp's engine vs the research-code baseline.

    python benchmarks/prune_speed.py [--nsamples 32 --seqlen 512] [--out benchmarks/results/prune_speed.json]

Three variants run one after another, each in a fresh process (so peak RSS is its own), in the same invocation:

* ``baseline`` — what the released DLP/Wanda scripts do: the whole model resident on the compute device, the
  first layer's inputs captured with a "Catcher", then a dense sweep that runs every layer twice (once with
  statistics hooks for the ratios, once more for its outputs) and a pruning sweep that again runs every layer
  twice (statistics, prune, outputs). It shares dlp's scoring and mask functions, so masks must be identical.
* ``engine`` — dlp's default (sequential) mode: one forward per layer in the dense scoring sweep, two in the
  pruning sweep; only the current layer on the device.
* ``fast`` — dlp's fast mode: one dense sweep (one forward per layer) yields the DLP ratios and the Wanda
  statistics; every Linear is then pruned from those statistics, with no second sweep.

Perplexity (first 64×512 windows of the WikiText-2 test split) of ``engine`` and ``fast`` is measured after the
timed part. On CUDA the peak device memory is reported too, the clocks are read after a synchronisation, the model
runs in bfloat16 (``--dtype``; float32 on a CPU, where the figures in docs/results.md were measured), the engine's
placement of the hidden states is printed, and the masks' agreement with the baseline's is counted bit by bit (GPU
kernels are not bit-deterministic, so digests may differ where almost every bit agrees).

    python benchmarks/prune_speed.py --model M --nsamples 128 --seqlen 2048 --dtype float16 --variants engine \
        --memory_cap_gib 24 --ppl 0        # paper scale inside a 24 GB card (the cap is enforced by torch)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from dlp.allocate import balance, dlp_sparsities  # noqa: E402
from dlp.data import load_calibration  # noqa: E402
from dlp.evaluate import perplexity  # noqa: E402
from dlp.rundir import atomic_write_json  # noqa: E402
from dlp.criteria import PruneSpec, prune_linear  # noqa: E402
from dlp.pruner import layer_param_counts, prune_model  # noqa: E402
from dlp.scoring import _layer_score, score_layers, token_cosines  # noqa: E402
from dlp.masks import MaskSet  # noqa: E402
from dlp.modeling import DEMO_MODEL, find_decoder_layers, find_linears, load_model_and_tokenizer  # noqa: E402
from dlp.process import setup  # noqa: E402
from dlp.stats import InputStats  # noqa: E402
from dlp.sweep import LayerContext  # noqa: E402
from dlp.resources import peak_rss_mib, synchronize  # noqa: E402

SPARSITY, ALPHA = 0.7, 0.15


class _Catcher(Exception):
    pass


def _research_capture(model: nn.Module, ids: torch.Tensor, device: torch.device):
    """The research scripts' Catcher: stop at layer 0, keep its inputs and its keyword arguments."""
    _, layers = find_decoder_layers(model)
    inputs, kwargs_seen = [], {}

    def grab(_module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])
        kwargs_seen.update(
            {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache", "hidden_states")}
        )
        raise _Catcher

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    for row in ids:
        try:
            model(row.unsqueeze(0).to(device), use_cache=False)
        except _Catcher:
            pass
    handle.remove()
    return torch.cat(inputs), kwargs_seen


def _per_linear_hooks(linears: dict[str, nn.Linear], stats: dict[str, InputStats]):
    """One hook per Linear, each reducing its own input (the research scripts' WrappedGPT.add_batch)."""
    from dlp.stats import _SharedReducer, stats_hook

    return [lin.register_forward_pre_hook(stats_hook(stats[name], _SharedReducer())) for name, lin in linears.items()]


@torch.no_grad()
def _run_layer(layer, inps, kwargs):
    return torch.cat([layer(inps[j : j + 1], **kwargs) for j in range(inps.shape[0])])


@torch.no_grad()
def _statistics_pass(layer, inps, kwargs) -> tuple[dict[str, nn.Linear], dict[str, InputStats]]:
    """One forward of the layer over every sample with a statistics hook on each Linear."""
    linears = find_linears(layer)
    stats = {name: InputStats(lin.in_features) for name, lin in linears.items()}
    handles = _per_linear_hooks(linears, stats)
    _run_layer(layer, inps, kwargs)
    for handle in handles:
        handle.remove()
    return linears, stats


@torch.no_grad()
def baseline(model, ids, device) -> MaskSet:
    model.to(device)  # the whole model resident
    prefix, layers = find_decoder_layers(model)
    scores = []
    inps, kwargs = _research_capture(model, ids, device)
    for index, layer in enumerate(layers):  # dense sweep for the ratios: each layer twice
        linears, stats = _statistics_pass(layer, inps, kwargs)
        outs = _run_layer(layer, inps, kwargs)
        ctx = LayerContext(index, layer, linears, inps, device, None)
        cosine = torch.cat([token_cosines(inps[j], outs[j]) for j in range(inps.shape[0])])
        scores.append(_layer_score(ctx, stats, cosine, 5.0))
        inps = outs
    sparsities = balance(
        dlp_sparsities([s.wanda_median for s in scores], SPARSITY, ALPHA), layer_param_counts(model), SPARSITY
    )
    masks = {}
    inps, kwargs = _research_capture(model, ids, device)
    for index, layer in enumerate(layers):  # pruning sweep: each layer twice
        linears, stats = _statistics_pass(layer, inps, kwargs)
        for name, lin in linears.items():
            masks[f"{prefix}.{index}.{name}"] = prune_linear(lin, stats[name], sparsities[index], PruneSpec("wanda"))
        inps = _run_layer(layer, inps, kwargs)
    return MaskSet(masks)


def engine(model, ids, device, mode: str, memory: str) -> MaskSet:
    scoring = score_layers(model, ids, device=device, batch_size=8, keep_stats=mode == "fast", memory=memory)
    scores, stats = scoring.layers, scoring.stats
    sparsities = balance(
        dlp_sparsities([s.wanda_median for s in scores], SPARSITY, ALPHA), layer_param_counts(model), SPARSITY
    )
    spec = PruneSpec("wanda")
    return prune_model(model, ids, sparsities, spec, mode=mode, device=device, batch_size=8, stats=stats, memory=memory)


def run_variant(variant: str, args) -> dict:
    setup(0)
    device = torch.device(args.device)
    if device.type == "cuda" and args.memory_cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), device)
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
    ids = load_calibration(tokenizer, "builtin:wikitext2-valid", args.nsamples, args.seqlen, seed=0).input_ids
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    if variant == "baseline":
        masks = baseline(model, ids, device)
    else:
        masks = engine(model, ids, device, variant.replace("engine", "sequential"), args.calibration_memory)
    synchronize(device)
    seconds = time.perf_counter() - start
    masks.save(Path(args.masks_dir) / f"{variant}.safetensors")
    result = {
        "variant": variant,
        "seconds": seconds,
        "masks_digest": masks.digest(),
        "peak_rss_mib": peak_rss_mib(),
        "sparsity": masks.sparsity_report()["overall"],
    }
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if variant != "baseline" and args.ppl:
        model.to("cpu")
        result["ppl"] = perplexity(model, tokenizer, "builtin:wikitext2-test", 512, 64, device=device).value
    return result


def bit_agreement(left: Path, right: Path) -> float:
    """Share of mask bits two runs agree on (1.0: identical masks)."""
    a, b = MaskSet.load(left).masks, MaskSet.load(right).masks
    differing = sum(int((a[name] != b[name]).sum()) for name in a)
    return 1.0 - differing / sum(mask.numel() for mask in a.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEMO_MODEL)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16; default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--variants", default="baseline,engine,fast", help="a comma-separated subset")
    parser.add_argument("--calibration_memory", default="auto", help="the engine's budget: auto | host | GiB")
    parser.add_argument("--memory_cap_gib", type=float, default=0, help="CUDA: cap this process's device memory")
    parser.add_argument("--ppl", type=int, default=1, help="1: also measure perplexity of engine and fast")
    parser.add_argument("--variant", choices=["baseline", "engine", "fast"], help=argparse.SUPPRESS)
    parser.add_argument("--masks_dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/prune_speed.json")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant, args)), flush=True)
        return
    variants = args.variants.split(",")
    if any(v not in ("baseline", "engine", "fast") for v in variants):
        parser.error("--variants takes a comma-separated subset of baseline, engine, fast")
    results = {}
    with tempfile.TemporaryDirectory() as masks_dir:
        for variant in variants:
            forwarded = ["--model", args.model, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
            forwarded += ["--device", args.device, "--dtype", args.dtype, "--ppl", str(args.ppl)]
            forwarded += ["--calibration_memory", args.calibration_memory, "--memory_cap_gib", str(args.memory_cap_gib)]
            cmd = [sys.executable, __file__, "--variant", variant, "--masks_dir", masks_dir, *forwarded]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((row for row in proc.stdout.splitlines() if row.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            placement = [row for row in proc.stdout.splitlines() if row.startswith("[dlp] calibration")]
            results[variant] = json.loads(line[len("RESULT ") :]) | ({"placement": placement[0]} if placement else {})
            print(json.dumps(results[variant]), flush=True)
        summary = _summary(results, Path(masks_dir), args)
    atomic_write_json(args.out, {"config": vars(args), "results": results, "summary": summary})
    print(json.dumps(summary, indent=2))


def _summary(results: dict, masks_dir: Path, args) -> dict:
    """Ratios against the baseline (when it ran) and the engine's masks' bit agreement with it."""
    summary = {}
    base = results.get("baseline")
    for variant in ("engine", "fast"):
        if variant not in results or base is None:
            continue
        summary[f"speedup_{variant}"] = base["seconds"] / results[variant]["seconds"]
        if "peak_cuda_mib" in base:
            summary[f"peak_cuda_ratio_{variant}"] = results[variant]["peak_cuda_mib"] / base["peak_cuda_mib"]
    if base is not None and "engine" in results:
        summary["masks_identical_engine_vs_baseline"] = base["masks_digest"] == results["engine"]["masks_digest"]
        summary["mask_bit_agreement_engine_vs_baseline"] = bit_agreement(
            masks_dir / "baseline.safetensors", masks_dir / "engine.safetensors"
        )
    if args.ppl and {"engine", "fast"} <= results.keys():
        summary["ppl_fast_vs_engine"] = results["fast"]["ppl"] / results["engine"]["ppl"] - 1
    return summary


if __name__ == "__main__":
    main()
