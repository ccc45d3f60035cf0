"""Do denormal floats slow a pruned model on CPU? Times forwards with and without flushing them, in one run.

    python benchmarks/denormals.py --model outputs/smollm2-135m/dlp_wanda_70/model [--windows 4]

Counts subnormal values among the weights and in the hidden states of one forward, then times the same
forwards alternately with ``torch.set_flush_denormal(False)`` and ``(True)``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dlp.evaluate import eval_stream  # noqa: E402
from dlp.data import consecutive_windows  # noqa: E402
from dlp.modeling import load_model_and_tokenizer  # noqa: E402

TINY = torch.finfo(torch.float32).tiny


def subnormal_share(tensor: torch.Tensor) -> float:
    t = tensor.detach().float()
    return float(((t != 0) & (t.abs() < TINY)).float().mean())


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model)
    ids = consecutive_windows(eval_stream(tokenizer, "builtin:wikitext2-test"), 512, args.windows)
    weights = sum(subnormal_share(p) * p.numel() for p in model.parameters()) / sum(
        p.numel() for p in model.parameters()
    )
    torch.set_flush_denormal(False)
    hidden = model(ids[:1], output_hidden_states=True).hidden_states
    acts = sum(subnormal_share(h) for h in hidden) / len(hidden)
    print(f"subnormal share: weights {weights:.2e}, hidden states {acts:.2e}")
    times = {False: [], True: []}
    for _ in range(args.repeats):
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            start = time.perf_counter()
            for row in ids:
                model(row.unsqueeze(0))
            times[flush].append(time.perf_counter() - start)
    slow, fast = min(times[False]), min(times[True])
    print(f"{args.windows} windows: no flush {slow:.2f} s, flush {fast:.2f} s, ratio {slow / fast:.2f}x")


if __name__ == "__main__":
    main()
