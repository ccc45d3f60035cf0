"""Compressed exports (mask bits + kept values) against dense ones: size, memory and CPU decode speed, side by side.

    python benchmarks/sparse_decode.py [--shape all|1b|smollm2] [--smollm2 RUN/model] [--sparsity 0.5,0.6,0.7,0.8]
        [--new_tokens 32] [--dtypes float32,bfloat16] [--repeats 3] [--out benchmarks/results/sparse_decode.json]

    python benchmarks/sparse_decode.py --shape 1b --sparsity 0.7 --new_tokens 32   # the issue's check

The last line sums up every decode measured: ``decode: sparse X.XX× dense tokens/s; tokens identical: yes`` (or
``no``), with the lowest speed-up of all rows (each dtype and sparsity), and ``yes`` only if every row's greedy
tokens match the dense model's; one line per row above it says which.

Three parts, each timing dense and compressed in turns (dense, compressed, dense, ...) in one process with the same
threads, after a warm-up, and reporting medians, so a noisy machine slows both alike:

1. **Per projection**: one token through every projection shape of a 1B Llama (hidden 2048, intermediate 5632,
   4 KV heads: TinyLlama's shape) at each sparsity: dense ``F.linear``, dlp's kernel, and torch's CSR matmul.
2. **1B decode**: a random-weight Llama of that shape (22 layers), pruned at random to each sparsity in each value
   dtype, exported compressed and reloaded through its own loader (``SparseLinear``); greedy generation of
   ``--tokens`` tokens after a 32-token prompt: first-token latency, decode tokens/s, memory (the bytes of each
   model's tensors, and how much the resident set grew by loading it and generating two tokens, so weights read
   lazily from a memory-mapped file count), file size, and whether the generated tokens are identical.
3. **SmolLM2** (``--smollm2``: a dense dlp export with its masks, e.g. ``train/prune.py``'s 70% DLP ``model/``):
   the same measurements on the real model and real prompts.

4. **Quality** (``--smollm2``, part ``quality``): WikiText-2 test perplexity (64 windows of 512 tokens, dlp's
   protocol) of the dense export and of the compressed exports with model-dtype, int8, int4 and NF4 values, each
   reloaded decompressed through its own loader, with its size.

Sizes: the pruned projections' stored bytes against the same projections dense in bf16 (the physical limit at
70% with bf16 values is 0.3 + 1/16 = 0.3625), and the weight file against the dense model's in bf16.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dlp.compress import checkpoint_sizes, compress_projection, export_compressed  # noqa: E402
from dlp.compressed import SparseLinear, load_compressed  # noqa: E402
from dlp.masks import MaskSet, masks_of_model  # noqa: E402
from dlp.modeling import prunable_linears  # noqa: E402
from dlp.rundir import atomic_write_json  # noqa: E402

SHAPE_PARTS = {
    "all": ["projections", "1b", "smollm2", "quality"],
    "1b": ["projections", "1b"],
    "smollm2": ["smollm2", "quality"],
}
SHAPES_1B = {"q_proj/o_proj": (2048, 2048), "k_proj/v_proj": (256, 2048), "gate/up": (5632, 2048), "down": (2048, 5632)}
PROMPTS = [
    "The history of the Roman Empire",
    "Explain how a refrigerator keeps food cold.",
    "Write a short poem about the sea.",
]


def cpu_line() -> str:
    """The CPU as lscpu names it, with the vector extensions that matter here."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("Flags")), []))
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {torch.get_num_threads()} threads, {' '.join(have) or 'no AVX2'}"


# Loads a model directory in a fresh process, generates two tokens, prints the resident set's growth and its peak.
# The architecture's modeling module (139 MiB resident for Llama's) is imported before the baseline: it is code
# both loaders need, not the model.
_RSS_CHILD = r"""
import importlib, sys, torch
from transformers import AutoModelForCausalLM
def mib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field))
path, dtype, remote, kind = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
before = mib("VmRSS:")
extra = {"trust_remote_code": True} if remote else {"dtype": getattr(torch, dtype)}
model = AutoModelForCausalLM.from_pretrained(path, **extra).eval()
with torch.no_grad():
    model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
print(mib("VmRSS:") - before, mib("VmHWM:") - before)
"""


def fresh_rss(path: Path, dtype: torch.dtype, remote: bool) -> tuple[float, float]:
    """(MiB the resident set grew by, MiB it peaked at above where it started) for loading ``path`` and generating
    two tokens, in a process of its own: in this one, memory the allocator kept from earlier models would hide the
    growth. ``remote``: the sparse checkpoint through its own loader (``trust_remote_code=True``)."""
    config = json.loads((path / "config.json").read_text())
    kind = config["base_config"]["model_type"] if remote else config["model_type"]
    args = [sys.executable, "-c", _RSS_CHILD, str(path), str(dtype)[6:], "1" if remote else "0", kind]
    done = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"measuring the memory of {path} failed: {done.stderr[-2000:]}")
    grew, peak = done.stdout.split()[-2:]
    return float(grew), float(peak)


def memory_row(dense, dense_dir: Path, sparse, sparse_dir: Path, dtype: torch.dtype) -> dict:
    """Each model's tensor bytes, and its resident memory measured in a fresh process (:func:`fresh_rss`)."""
    dense_rss, dense_peak = fresh_rss(dense_dir, dtype, remote=False)
    sparse_rss, sparse_peak = fresh_rss(sparse_dir, dtype, remote=True)
    return {
        "dense_tensor_mib": tensor_mib(dense),
        "compressed_tensor_mib": tensor_mib(sparse),
        "dense_rss_mib": dense_rss,
        "compressed_rss_mib": sparse_rss,
        "dense_peak_rss_mib": dense_peak,
        "compressed_peak_rss_mib": sparse_peak,
        "rss_ratio": sparse_rss / dense_rss,
    }


def tensor_mib(model) -> float:
    """The bytes of the model's parameters and buffers (each storage once): what it needs in memory."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2**20


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int, inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed in turns after one warm-up call each."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


COLD_BYTES = 512 << 20  # a working set larger than any L3 cache: each call reads its weights from memory


@torch.no_grad()
def projections(sparsities: list[float], dtypes: list[torch.dtype], repeats: int) -> list[dict]:
    """One token through each 1B projection, timed twice: *hot*, the same weights every call (a 2048x2048 fp32
    matrix is 16 MB and stays in a 32 MB L3 cache), and *cold*, cycling through distinct copies that together
    exceed :data:`COLD_BYTES`, so each call reads its weights from memory as every projection does in a decode
    step (22 layers of weights never fit in a cache)."""
    rows = []
    for label, (out, inn) in SHAPES_1B.items():
        for sparsity in sparsities:
            g = torch.Generator().manual_seed(0)
            weight = torch.randn(out, inn, generator=g) * 0.02
            mask = torch.rand(out, inn, generator=g) >= sparsity
            for dtype in dtypes:
                row = {"shape": label, "out": out, "in": inn, "sparsity": sparsity, "dtype": str(dtype)[6:]}
                row.update(_projection_times(weight, mask, dtype, repeats))
                rows.append(row)
                print(
                    f"  {label:14s} {out}x{inn} {100 * sparsity:.0f}% {row['dtype']:8s} hot: dense "
                    f"{row['dense_us']:7.1f} us, dlp {row['dlp_us']:7.1f} us ({row['speedup']:.2f}x)"
                    + (f", csr {row['csr_us']:7.1f} us ({row['csr_speedup']:.2f}x)" if "csr_us" in row else "")
                    + f" | cold: dense {row['cold_dense_us']:7.1f} us, dlp {row['cold_dlp_us']:7.1f} us "
                    f"({row['cold_speedup']:.2f}x)",
                    flush=True,
                )
    return rows


def _projection_times(weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype, repeats: int) -> dict:
    """Microseconds per call of dense ``F.linear``, dlp's kernel and (fp32) torch's CSR matmul, hot and cold."""
    dense = (weight * mask).to(dtype)
    layer = SparseLinear(*compress_projection(dense, mask, "model", 0), None, dtype)
    x = torch.randn(1, weight.shape[1]).to(dtype)
    fns = {"dense": lambda: F.linear(x, dense), "dlp": lambda: layer(x)}
    if dtype == torch.float32:
        csr, xt = dense.to_sparse_csr(), x.t().contiguous()
        fns["csr"] = lambda: torch.sparse.mm(csr, xt)
    hot = interleaved(fns, repeats * 5, inner=20)
    copies = max(2, -(-COLD_BYTES // (dense.numel() * dense.element_size())))
    denses = [dense.clone() for _ in range(copies)]  # distinct memory, the same values
    layers = [SparseLinear(*compress_projection(d, mask, "model", 0), None, dtype) for d in denses]
    turn = itertools.count()
    cold = interleaved(
        {
            "dense": lambda: F.linear(x, denses[next(turn) % copies]),
            "dlp": lambda: layers[next(turn) % copies](x),
        },
        repeats * 5,
        inner=copies,
    )
    times = {f"{k}_us": 1e6 * v for k, v in hot.items()} | {f"cold_{k}_us": 1e6 * v for k, v in cold.items()}
    times.update(speedup=hot["dense"] / hot["dlp"], cold_speedup=cold["dense"] / cold["dlp"], cold_copies=copies)
    if "csr" in hot:
        times["csr_speedup"] = hot["dense"] / hot["csr"]
    return times


def llama_1b(dtype: torch.dtype, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)  # transformers' own initialisation (normal, std 0.02)
    return model.to(dtype).eval()


def random_masks(model, sparsity: float) -> MaskSet:
    g = torch.Generator().manual_seed(1)
    masks = {name: torch.rand(m.weight.shape, generator=g) >= sparsity for name, m in prunable_linears(model).items()}
    mask_set = MaskSet(masks, {"model": "random 1B llama"})
    mask_set.apply(model)
    return mask_set


def dense_sizes(model) -> dict:
    """The projections' and the whole model's bytes in bf16, a tied embedding counted once (as it is stored)."""
    projections = sum(m.weight.numel() for m in prunable_linears(model).values())
    everything = {t.data_ptr(): t.numel() for t in model.state_dict().values()}
    return {"projection_bf16_bytes": 2 * projections, "model_bf16_bytes": 2 * sum(everything.values())}


@torch.no_grad()
def decode(dense, sparse, prompts: list[torch.Tensor], tokens: int, repeats: int) -> dict:
    """First-token latency and decode tokens/s of both models, in turns, and whether their tokens agree."""

    def generate(model, ids, count):
        return model.generate(
            ids, max_new_tokens=count, min_new_tokens=count, do_sample=False, pad_token_id=0, use_cache=True
        )

    same = all(torch.equal(generate(dense, ids, tokens), generate(sparse, ids, tokens)) for ids in prompts)
    result = {"identical_tokens": same}
    models = {"dense": dense, "compressed": sparse}
    first = interleaved({k: (lambda m=m: [generate(m, ids, 1) for ids in prompts]) for k, m in models.items()}, repeats)
    whole = interleaved(
        {k: (lambda m=m: [generate(m, ids, tokens) for ids in prompts]) for k, m in models.items()}, repeats
    )
    for name in models:
        result[f"{name}_first_token_s"] = first[name] / len(prompts)
        result[f"{name}_tokens_per_s"] = (tokens - 1) * len(prompts) / (whole[name] - first[name])
    result["decode_speedup"] = result["compressed_tokens_per_s"] / result["dense_tokens_per_s"]
    return result


def bench_1b(sparsities, dtypes, tokens, repeats, layers, workdir: Path) -> list[dict]:
    rows = []
    prompts = [torch.randint(1, 32000, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for dtype in dtypes:
        for sparsity in sparsities:
            target = workdir / f"c-{sparsity}-{dtype}"

            dense = llama_1b(dtype, layers)
            export_compressed(dense, _NoTokenizer(), random_masks(dense, sparsity), target)
            dense.save_pretrained(workdir / "dense")  # for the fresh-process memory measurement
            gc.collect()
            sparse = load_compressed(target, "sparse")
            row = {"model": f"random Llama 1B shape, {layers} layers", "sparsity": sparsity, "dtype": str(dtype)[6:]}
            row.update(_sizes(dense, target))
            row.update(memory_row(dense, workdir / "dense", sparse, target, dtype))
            _remove(workdir / "dense")
            row.update(decode(dense, sparse, prompts, tokens, repeats))
            rows.append(row)
            _print_row(row)
            del dense, sparse
            _remove(target)
    return rows


class _NoTokenizer:
    """A random-weight model has no tokenizer to save."""

    def save_pretrained(self, path) -> None:
        pass


def _sizes(dense, target: Path) -> dict:
    sizes = checkpoint_sizes(target)
    reference = dense_sizes(dense)
    return {
        "file_mb": sizes["file_bytes"] / 1e6,
        "dense_bf16_file_mb": reference["model_bf16_bytes"] / 1e6,
        "projection_ratio_vs_bf16": sizes["projection_bytes"] / reference["projection_bf16_bytes"],
        "file_ratio_vs_bf16": sizes["file_bytes"] / reference["model_bf16_bytes"],
    }


def _print_row(row: dict) -> None:
    print(
        f"  {row['model']} {100 * row['sparsity']:.0f}% {row['dtype']}: decode {row['dense_tokens_per_s']:.2f} → "
        f"{row['compressed_tokens_per_s']:.2f} tok/s ({row['decode_speedup']:.2f}x), first token "
        f"{row['dense_first_token_s']:.3f} → {row['compressed_first_token_s']:.3f} s, tensors "
        f"{row['dense_tensor_mib']:.0f} → {row['compressed_tensor_mib']:.0f} MiB (resident in a fresh process "
        f"{row['dense_rss_mib']:.0f} → {row['compressed_rss_mib']:.0f} MiB, {row['rss_ratio']:.3f}x), projections "
        f"{row['projection_ratio_vs_bf16']:.3f}x bf16, file {row['file_mb']:.0f} MB "
        f"({row['file_ratio_vs_bf16']:.3f}x bf16), identical tokens: {row['identical_tokens']}",
        flush=True,
    )


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def bench_smollm2(model_dir: str, dtypes, tokens, repeats, workdir: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    masks = MaskSet.load(masks_of_model(model_dir))
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt")
        for p in PROMPTS
    ]
    prompts = [p["input_ids"] if not torch.is_tensor(p) else p for p in prompts]
    rows = []
    for dtype in dtypes:
        target = workdir / f"smollm2-{dtype}"

        dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        export_compressed(dense, tokenizer, masks, target)
        gc.collect()
        sparse = load_compressed(target, "sparse")
        row = {"model": "SmolLM2-135M 70% DLP", "sparsity": masks.sparsity_report()["overall"], "dtype": str(dtype)[6:]}
        row.update(_sizes(dense, target))
        row.update(memory_row(dense, Path(model_dir), sparse, target, dtype))
        row.update(decode(dense, sparse, prompts, tokens, repeats))
        row["per_token_overhead_ms"] = _overhead_ms(sparse, prompts[0])
        rows.append(row)
        _print_row(row)
        print(f"    SparseLinear per-call overhead: {row['per_token_overhead_ms']:.2f} ms per token", flush=True)
        del dense, sparse
        _remove(target)
    return rows


@torch.no_grad()
def _overhead_ms(model, ids) -> float:
    """What SparseLinear's Python around the kernel costs per token: its layers timed with the kernel call
    replaced by a preallocated result (same conversions, padding and reshapes)."""
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    x = {id(layer): torch.randn(1, 1, layer.in_features, dtype=layer.dtype) for layer in layers}
    full = median_time(lambda: [layer(x[id(layer)]) for layer in layers], 5)
    kernel = layers[0]._kernel()
    calls = [
        (layer, x[id(layer)].reshape(1, -1).float().contiguous()) for layer in layers if layer.in_features % 8 == 0
    ]
    only = median_time(
        lambda: [
            kernel.sparse_matmul(
                flat,
                layer.bits,
                layer.row_ptr,
                layer.values,
                layer.kind,
                layer.codebook,
                layer.scales,
                layer.group_size,
            )
            for layer, flat in calls
        ],
        5,
    )
    return 1e3 * (full - only)


def quality(model_dir: str, workdir: Path, group_size: int, values_list: list[str]) -> list[dict]:
    """Perplexity of the dense export and of each compressed export, decompressed (the same numbers the sparse
    model gives, up to float summation order), and the compressed exports' sizes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlp.evaluate import perplexity

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    masks = MaskSet.load(masks_of_model(model_dir))
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    reference = None
    for values in ("dense", *values_list):
        if values == "dense":
            model, sizes = dense, {}
        else:
            target = workdir / f"quality-{values}"
            export_compressed(dense, tokenizer, masks, target, values, group_size)
            model, sizes = load_compressed(target, "dense"), checkpoint_sizes(target)
        ppl = perplexity(model, tokenizer, "builtin:wikitext2-test", seqlen=512, max_windows=64).value
        reference = reference or ppl
        row = {"values": values, "group_size": group_size if values not in ("dense", "model") else None, "ppl": ppl}
        row["ppl_vs_dense"] = ppl / reference - 1
        row.update({k: sizes[k] for k in ("projection_ratio", "file_bytes")} if sizes else {})
        rows.append(row)
        print(f"  {values:6s} perplexity {ppl:.3f} ({100 * row['ppl_vs_dense']:+.2f}% vs dense)", flush=True)
        if values != "dense":
            del model
            _remove(target)
    return rows


def markdown(result: dict) -> str:
    """The tables of docs/results.md, from a result file (``--report``)."""
    lines = [f"CPU: {result['cpu']}; greedy decode of {result['tokens']} tokens after the prompt.", ""]
    if result.get("projections"):
        lines += [
            "| projection | sparsity | values | hot: dense F.linear | dlp kernel | torch CSR | cold: dense | dlp |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in result["projections"]:
            csr = f"{r['csr_us']:.0f} µs ({r['csr_speedup']:.2f}×)" if "csr_us" in r else "–"
            cold = (
                f"{r['cold_dense_us']:.0f} µs | {r['cold_dlp_us']:.0f} µs (**{r['cold_speedup']:.2f}×**)"
                if "cold_dlp_us" in r
                else "– | –"  # result files from before the cold measurement
            )
            lines.append(
                f"| {r['shape']} {r['out']}×{r['in']} | {100 * r['sparsity']:.0f}% | {r['dtype']} | "
                f"{r['dense_us']:.0f} µs | {r['dlp_us']:.0f} µs (**{r['speedup']:.2f}×**) | {csr} | {cold} |"
            )
        lines.append("")
    for key in ("decode_1b", "decode_smollm2"):
        if not result.get(key):
            continue
        lines += [
            "| model | sparsity | values | decode tok/s dense → compressed | first token (s) | tensors (MiB) | "
            "pruned projections vs bf16 | file (MB), vs bf16 | same tokens |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result[key]:
            lines.append(
                f"| {r['model']} | {100 * r['sparsity']:.0f}% | {r['dtype']} | {r['dense_tokens_per_s']:.2f} → "
                f"{r['compressed_tokens_per_s']:.2f} (**{r['decode_speedup']:.2f}×**) | "
                f"{r['dense_first_token_s']:.3f} → {r['compressed_first_token_s']:.3f} | "
                f"{r['dense_tensor_mib']:.0f} → {r['compressed_tensor_mib']:.0f} | "
                f"{r['projection_ratio_vs_bf16']:.3f}× | {r['file_mb']:.0f} ({r['file_ratio_vs_bf16']:.3f}×) | "
                f"{'yes' if r['identical_tokens'] else 'no'} |"
            )
        lines.append("")
    if result.get("quality"):
        lines += ["| export | perplexity | vs dense export | pruned projections vs bf16 |", "|---|---|---|---|"]
        for r in result["quality"]:
            ratio = f"{r['projection_ratio']:.3f}×" if "projection_ratio" in r else "–"
            group = f", groups of {r['group_size']}" if r.get("group_size") else ""
            lines.append(f"| {r['values']}{group} | {r['ppl']:.3f} | {100 * r['ppl_vs_dense']:+.2f}% | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", help="a dense dlp export with masks.safetensors (the 70%% DLP SmolLM2 model/)")
    parser.add_argument("--shape", choices=sorted(SHAPE_PARTS), default="all", help="which model(s) to measure")
    parser.add_argument("--sparsity", "--sparsities", dest="sparsities", default="0.5,0.6,0.7,0.8")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--new_tokens", "--tokens", dest="tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=22, help="decoder layers of the 1B model")
    parser.add_argument("--parts", help="a subset of projections,1b,smollm2,quality (default: the shape's)")
    parser.add_argument("--group_size", type=int, default=128, help="int8 and 4-bit steps: columns per group")
    parser.add_argument("--values", default="model,int8,int4,nf4", help="the compressed exports' value formats")
    parser.add_argument("--out", default="benchmarks/results/sparse_decode.json")
    parser.add_argument("--report", help="print a result file's tables as Markdown, and measure nothing")
    args = parser.parse_args()
    if args.report:
        print(markdown(json.loads(Path(args.report).read_text())))
        return
    sparsities = [float(s) for s in args.sparsities.split(",")]
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    parts = args.parts.split(",") if args.parts else SHAPE_PARTS[args.shape]
    if args.shape == "smollm2" and not args.smollm2:
        parser.error("--shape smollm2 needs --smollm2 RUN/model (a dense dlp export with its masks)")
    result: dict = {"cpu": cpu_line(), "tokens": args.tokens}
    print(f"[bench] {result['cpu']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sparse-decode-", dir="/tmp") as work:
        if "projections" in parts:
            print("[bench] one token through each 1B projection", flush=True)
            result["projections"] = projections(sparsities, dtypes, args.repeats)
            atomic_write_json(args.out, result)  # each part as soon as it is measured
        if "1b" in parts:
            print(f"[bench] 1B decode, {args.tokens} tokens", flush=True)
            result["decode_1b"] = bench_1b(sparsities, dtypes, args.tokens, args.repeats, args.layers, Path(work))
            atomic_write_json(args.out, result)
        if "smollm2" in parts and args.smollm2:
            print(f"[bench] SmolLM2 decode, {args.tokens} tokens", flush=True)
            result["decode_smollm2"] = bench_smollm2(args.smollm2, dtypes, args.tokens, args.repeats, Path(work))
            atomic_write_json(args.out, result)
        if "quality" in parts and args.smollm2:
            print("[bench] SmolLM2 perplexity of each export (WikiText-2 test, 64 x 512)", flush=True)
            result["quality"] = quality(args.smollm2, Path(work), args.group_size, args.values.split(","))
    atomic_write_json(args.out, result)
    print(f"[bench] wrote {args.out}")
    rows = result.get("decode_1b", []) + result.get("decode_smollm2", [])
    if rows:
        print("\n".join(headline(rows)))


def headline(rows: list[dict]) -> list[str]:
    """A line for each decode row, then the summary line: the lowest speed-up of them all, and ``yes`` only if every
    row's greedy tokens matched the dense model's."""
    lines = [
        f"  {row['model']} {100 * row['sparsity']:.0f}% {row['dtype']}: sparse {row['decode_speedup']:.2f}× dense "
        f"tokens/s; tokens identical: {'yes' if row['identical_tokens'] else 'no'}"
        for row in rows
    ]
    slowest = min(row["decode_speedup"] for row in rows)
    same = "yes" if all(row["identical_tokens"] for row in rows) else "no"
    return [*lines, f"decode: sparse {slowest:.2f}× dense tokens/s; tokens identical: {same}"]


if __name__ == "__main__":
    main()
