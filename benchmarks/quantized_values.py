"""Where 4-bit kept values lose perplexity: the unpruned model against the pruned one, and each kind and depth of
projection on its own.

    python benchmarks/quantized_values.py --model RUN/model [--windows 16] [--values int4,nf4,int8]
        [--out benchmarks/results/quantized_values.json]

``--model``: a dense dlp export with its masks (``train/prune.py``'s ``model/``). Every measurement replaces the
projections' weights in place by what the compressed export's codes decode to (:func:`dlp.compress.quantize_values`,
the same codes the export writes) and measures WikiText-2 test perplexity on ``--windows`` windows of 512 tokens:

1. the unpruned model the masks were made for (the demo's SmolLM2), every projection quantized (all-true masks);
2. the pruned model, every projection quantized;
3. the pruned model, one kind of projection at a time (``q_proj``, ..., ``down_proj``), the rest as they are;
4. the pruned model, five decoder layers at a time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dlp.compress import quantize_values  # noqa: E402
from dlp.evaluate import perplexity  # noqa: E402
from dlp.masks import MaskSet, masks_of_model  # noqa: E402
from dlp.modeling import DEMO_MODEL, load_model_and_tokenizer, prunable_linears  # noqa: E402
from dlp.rundir import atomic_write_json  # noqa: E402

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def decoded(weight: torch.Tensor, mask: torch.Tensor, values: str, group_size: int) -> torch.Tensor:
    """The weight as the export's codes for it decode (pruned weights zero)."""
    codes, steps, group, codebook = quantize_values(weight.float(), mask, values, group_size)
    full = torch.zeros(mask.shape)
    full[mask] = torch.tensor(codebook)[codes.long()] if codebook is not None else codes.float()
    return full * steps.float().repeat_interleave(group, dim=1)[:, : mask.shape[1]]


class Swapper:
    """Puts decoded weights into a model's projections for a selection of them, and the originals back."""

    def __init__(self, model, masks: dict[str, torch.Tensor], values: str, group_size: int):
        self.linears = prunable_linears(model)
        self.original = {name: linear.weight.detach().clone() for name, linear in self.linears.items()}
        self.quantized = {
            name: decoded(self.original[name], masks[name], values, group_size).to(self.original[name].dtype)
            for name in self.linears
        }

    @torch.no_grad()
    def select(self, chosen) -> None:
        for name, linear in self.linears.items():
            linear.weight.copy_(self.quantized[name] if chosen(name) else self.original[name])


def run(args) -> dict:
    result: dict = {"windows": args.windows, "group_size": args.group_size, "rows": []}

    def measure(model, tokenizer, label: str, base: float | None) -> float:
        value = perplexity(model, tokenizer, "builtin:wikitext2-test", seqlen=512, max_windows=args.windows).value
        change = f" ({100 * (value / base - 1):+.2f}%)" if base else ""
        print(f"  {label}: {value:.3f}{change}", flush=True)
        result["rows"].append({"what": label, "perplexity": value, "change": value / base - 1 if base else None})
        return value

    dense, tokenizer = load_model_and_tokenizer(DEMO_MODEL, "float32")
    full = {name: torch.ones_like(linear.weight, dtype=torch.bool) for name, linear in prunable_linears(dense).items()}
    base = measure(dense.eval(), tokenizer, "unpruned model", None)
    for values in args.values.split(","):
        swap = Swapper(dense, full, values, args.group_size)
        swap.select(lambda name: True)
        measure(dense, tokenizer, f"unpruned model, {values}", base)
        swap.select(lambda name: False)
    del dense
    pruned, tokenizer = load_model_and_tokenizer(args.model, "float32")
    masks = MaskSet.load(masks_of_model(args.model)).masks
    base = measure(pruned.eval(), tokenizer, "pruned model", None)
    for values in args.values.split(","):
        swap = Swapper(pruned, masks, values, args.group_size)
        swap.select(lambda name: True)
        measure(pruned, tokenizer, f"pruned model, {values}", base)
        if values == args.values.split(",")[0]:  # where the first format's loss sits
            for kind in KINDS:
                swap.select(lambda name: name.endswith(kind))
                measure(pruned, tokenizer, f"pruned model, {values} on {kind} only", base)
            for start in range(0, len(pruned.model.layers), 5):
                swap.select(lambda name: start <= int(name.split(".")[2]) < start + 5)
                measure(pruned, tokenizer, f"pruned model, {values} on layers {start}-{start + 4} only", base)
        swap.select(lambda name: False)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a dense dlp export with masks (train/prune.py's model/)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--values", default="int4,nf4,int8")
    parser.add_argument("--group_size", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/quantized_values.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    atomic_write_json(args.out, run(args))
    print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
