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
timed part. On CUDA the peak device memory is reported too.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from dlp.allocate import balance, dlp_sparsities  # noqa: E402
from dlp.data import load_calibration  # noqa: E402
from dlp.evaluate import perplexity  # noqa: E402
from dlp.io import atomic_write_json  # noqa: E402
from dlp.criteria import PruneSpec, prune_linear  # noqa: E402
from dlp.pruner import _layer_score, layer_param_counts, prune_model, score_layers  # noqa: E402
from dlp.masks import MaskSet  # noqa: E402
from dlp.modeling import DEMO_MODEL, find_decoder_layers, find_linears, load_model_and_tokenizer  # noqa: E402
from dlp.process import setup  # noqa: E402
from dlp.stats import InputStats  # noqa: E402
from dlp.sweep import LayerContext  # noqa: E402

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
        scores.append(_layer_score(ctx, stats, outs, 5.0))
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


def engine(model, ids, device, mode: str) -> MaskSet:
    scoring = score_layers(model, ids, device=device, batch_size=8, keep_stats=mode == "fast")
    scores, stats = scoring.layers, scoring.stats
    sparsities = balance(
        dlp_sparsities([s.wanda_median for s in scores], SPARSITY, ALPHA), layer_param_counts(model), SPARSITY
    )
    return prune_model(model, ids, sparsities, PruneSpec("wanda"), mode=mode, device=device, batch_size=8, stats=stats)


def run_variant(variant: str, args) -> dict:
    setup(0)
    device = torch.device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model)
    ids = load_calibration(tokenizer, "builtin:wikitext2-valid", args.nsamples, args.seqlen, seed=0).input_ids
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    masks = (
        baseline(model, ids, device)
        if variant == "baseline"
        else engine(model, ids, device, variant.replace("engine", "sequential"))
    )
    seconds = time.perf_counter() - start
    result = {
        "variant": variant,
        "seconds": seconds,
        "masks_digest": masks.digest(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "sparsity": masks.sparsity_report()["overall"],
    }
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if variant != "baseline" and args.ppl:
        model.to("cpu")
        result["ppl"] = perplexity(model, tokenizer, "builtin:wikitext2-test", 512, 64, device=device).value
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEMO_MODEL)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ppl", type=int, default=1, help="1: also measure perplexity of engine and fast")
    parser.add_argument("--variant", choices=["baseline", "engine", "fast"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/prune_speed.json")
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant, args)), flush=True)
        return
    results = {}
    for variant in ("baseline", "engine", "fast"):
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--model",
            args.model,
            "--nsamples",
            str(args.nsamples),
            "--seqlen",
            str(args.seqlen),
            "--device",
            args.device,
            "--ppl",
            str(args.ppl),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((row for row in proc.stdout.splitlines() if row.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(line[len("RESULT ") :])
        print(json.dumps(results[variant]), flush=True)
    base, eng, fast = results["baseline"], results["engine"], results["fast"]
    summary = {
        "speedup_engine": base["seconds"] / eng["seconds"],
        "speedup_fast": base["seconds"] / fast["seconds"],
        "masks_identical_engine_vs_baseline": base["masks_digest"] == eng["masks_digest"],
        "ppl_fast_vs_engine": (fast["ppl"] / eng["ppl"] - 1) if args.ppl else None,
    }
    atomic_write_json(args.out, {"config": vars(args), "results": results, "summary": summary})
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
