"""Rendering the run reports: ``report.json`` (everything measured), ``summary.md`` (for people) and PNG plots.

The stages build their typed reports (:mod:`dlp.report_schema`) once; this module only renders them. What is drawn
is a :class:`View` that each compression method carries (``stage_view`` for its stage's summary, ``card_view`` for
the fine-tuned model's card); a method that sets none gets :data:`GENERIC_VIEW` (its perplexities and recipe), so a
new method renders before it has views of its own.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable, NamedTuple

from .chat_eval import MATCH_TOKENS
from .rundir import atomic_write_bytes, atomic_write_json, atomic_write_text
from .resources import resources_line
from .report_schema import FinetuneReport, StageReport


def layer_sparsity_from_modules(
    modules: dict[str, float], module_sizes: dict[str, int], num_layers: int, prefix: str
) -> list[float]:
    """Measured sparsity of each decoder layer (weighted by module size) from the per-module report."""
    removed = [0.0] * num_layers
    total = [0] * num_layers
    for name, sparsity in modules.items():
        index = int(name[len(prefix) + 1 :].split(".")[0])
        removed[index] += sparsity * module_sizes[name]
        total[index] += module_sizes[name]
    return [r / t if t else 0.0 for r, t in zip(removed, total)]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    pyplot().close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def finish_line_plot(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Axis labels, title, legend and grid of a line plot, then the PNG (the search's plots share this ending)."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def plot_layer_sparsity(
    path: Path, measured: list[float], target: float, title: str, ylabel: str = "sparsity (%)"
) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(measured) + 2), 3.6))
    ax.bar(range(len(measured)), [100 * s for s in measured], color="#4C72B0", label="measured")
    ax.axhline(100 * target, color="#C44E52", linestyle="--", linewidth=1.2, label=f"target {100 * target:.1f}%")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.set_ylim(max(0.0, 100 * min(measured) - 10), min(100.0, 100 * max(measured) + 5))
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def plot_loss(
    path: Path, steps: list[int], losses: list[float], title: str, parts: dict[str, list[float]] | None = None
) -> Path:
    """The training loss over the steps; ``parts`` (e.g. a distillation loss's LM and KL terms) drawn beside it."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    marker = "." if len(steps) < 40 else None
    ax.plot(steps, losses, color="#4C72B0", marker=marker, linewidth=1.2, label="loss")
    for (name, values), color in zip((parts or {}).items(), ("#DD8452", "#55A868")):
        ax.plot(steps, values, color=color, marker=marker, linewidth=1.0, linestyle="--", label=name)
    if parts:
        ax.legend(fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def _fmt_ppl(entry: dict | None) -> str:
    return "—" if not entry else f"{entry['value']:.2f}"


def _layer_table(report: dict[str, Any]) -> list[str]:
    """Allocated vs measured sparsity per layer, and the bar chart, as Markdown lines."""
    lines = ["| layer | allocated | measured |", "|---|---|---|"]
    for index, (alloc, meas) in enumerate(
        zip(report["layer_sparsity"]["allocated"], report["layer_sparsity"]["measured"])
    ):
        lines.append(f"| {index} | {100 * alloc:.2f}% | {100 * meas:.2f}% |")
    return lines + ["", "![per-layer sparsity](sparsity.png)", ""]


def plot_report_sparsity(path: Path, report: dict[str, Any]) -> Path:
    cfg = report["config"]
    return plot_layer_sparsity(
        path,
        report["layer_sparsity"]["measured"],
        cfg["sparsity"],
        f"{cfg['allocation']} + {cfg['criterion']}: per-layer sparsity",
    )


def summary_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    ppl = report.get("perplexity", {})
    any_ppl = next((p for p in ppl.values() if p), None)
    lines = [
        f"# Pruned {report['model']}",
        "",
        f"- criterion **{cfg['criterion']}**, pattern **{cfg['pattern']}**, allocation **{cfg['allocation']}**"
        + (f" (statistic {cfg['dlp_statistic']}, alpha {cfg['dlp_alpha']})" if cfg["allocation"] == "dlp" else ""),
        f"- target sparsity {100 * cfg['sparsity']:.1f}%, measured over the pruned Linears "
        f"**{100 * report['sparsity']['overall']:.2f}%** ({report['sparsity']['weights']:,} weights)",
        f"- calibration: {cfg['nsamples']}×{cfg['seqlen']} tokens of `{cfg['calibration_data']}`, seed {cfg['seed']}, "
        f"sha256 `{report['calibration_sha256'][:16]}…`",
        f"- masks: `masks.safetensors`, digest `{report['masks_digest'][:16]}…`",
        *_sparse_export_line(report.get("sparse_export")),
        f"- prune mode {cfg['prune_mode']}",
        resources_line(report["timings"], report.get("peak_memory")),
        "",
        "| model | perplexity |",
        "|---|---|",
        f"| dense | {_fmt_ppl(ppl.get('dense'))} |",
        f"| pruned | {_fmt_ppl(ppl.get('pruned'))} |",
        "",
    ]
    if any_ppl:
        lines += [f"Perplexity: `{any_ppl['source']}`, {any_ppl['windows']} windows × {any_ppl['seqlen']} tokens.", ""]
    return "\n".join(lines + _search_lines(report.get("allocation_details")) + _layer_table(report))


def _sparse_export_line(sparse: dict[str, Any] | None) -> list[str]:
    """Where the sparse checkpoint is and what it weighs (a run with ``export_sparse``)."""
    if not sparse:
        return []
    values = "the model dtype" if sparse["values"] == "model" else sparse["values"]
    return [
        f"- `{sparse['dir']}/`: mask bits + kept values ({values}), pruned projections "
        f"{sparse['projection_ratio']:.3f}× their bf16 size, weight file {sparse['file_ratio']:.3f}× the model's in "
        "bf16; loads with `trust_remote_code=True`"
    ]


def _search_lines(details: dict[str, Any] | None) -> list[str]:
    """The searched allocation's result, when the run searched (``search/allocation.json``)."""
    if not details or "start_fitness" not in details:
        return []
    return [
        f"Allocation searched for {details['search_s']:.0f} s ({details['generations']} generations) from "
        f"**{details['start']}**: KL to the dense model on all {details['fitness_windows']} calibration windows "
        f"{details['start_fitness']:.4f} → **{details['fitness']:.4f}** (kept: {details['kept']}). "
        "One-pass starts: " + ", ".join(f"{k} {v:.4f}" for k, v in details["start_candidates"].items()) + ".",
        "",
        "![search fitness](search/fitness.png) ![searched sparsities](search/sparsities.png)",
        "",
    ]


def _cached(cache: dict[str, Any]) -> str:
    """What a teacher cache holds (older reports counted windows)."""
    return (
        f"{cache['sequences']} sequences" if cache.get("sequences") is not None else f"{cache.get('windows')} windows"
    )


def _distillation_lines(report: dict[str, Any]) -> list[str]:
    distill = report.get("distillation")
    if not distill:
        return []
    cache = distill.get("cache")
    return [
        f"- distillation: teacher `{distill['teacher']}` ({distill['mode']}"
        + (f", top-{cache['top_k']} log-probabilities of {_cached(cache)} cached" if cache else "")
        + f"); loss = (1 − {distill['weight']})·LM + {distill['weight']}·T²·KL(teacher ‖ student), "
        f"T = {distill['temperature']}"
    ]


def _answer(text: str, limit: int = 300) -> str:
    """An answer in one table cell: one line, pipes escaped, cut at ``limit`` characters."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _chat_lines(report: dict[str, Any]) -> list[str]:
    """The chat evaluation: each model's answer perplexity and greedy match on the dense model's greedy answers to
    held-out prompts, then a few answers side by side."""
    chat = report.get("chat")
    if not chat:
        return []
    scores = chat["scores"]
    lines = [
        "",
        f"Chat: the dense model's greedy answers to {chat['count']} held-out prompts (`{chat['prompts']}`), scored "
        "by each model: perplexity of the answer tokens, and the share of the first "
        f"{MATCH_TOKENS} answer tokens it predicts greedily (teacher-forced).",
        "",
        "| model | answer perplexity | greedy match |",
        "|---|---|---|",
        *(f"| {name} | {entry['answer_ppl']:.2f} | {entry['greedy_match']:.3f} |" for name, entry in scores.items()),
    ]
    names = list(scores)  # dense first, then the compressed and the fine-tuned model
    for number, example in enumerate(chat["examples"], 1):
        lines += [
            "",
            f"Prompt {number}: {_answer(example['prompt'], 200)}",
            "",
            "| model | greedy answer |",
            "|---|---|",
        ]
        lines += [f"| {name} | {_answer(example[name])} |" for name in names if name in example]
    return lines


def _finetune_lines(report: dict[str, Any]) -> list[str]:
    """The LoRA and training lines shared by the cards of pruned and of sliced models."""
    cfg, train = report["config"], report["training"]
    lora, hyper = cfg["lora"], cfg["training"]
    return _distillation_lines(report) + [
        f"- LoRA: r={lora['lora_r']}, alpha={lora['lora_alpha']}, dropout={lora['lora_dropout']}, "
        f"targets {lora['lora_target_modules'] or 'every projection of each block'}",
        f"- training: `{cfg['train_data']}` ({_data_kind(train)}), {train['global_steps']} steps, "
        f"{train['tokens_seen']:,} tokens, "
        f"lr {hyper['learning_rate']}, {train['train_seconds']:.0f} s"
        + (f" (resumed from `{Path(train['resumed_from']).name}`)" if train.get("resumed_from") else ""),
        resources_line(report["timings"], report.get("peak_memory")),
    ]


def _data_kind(train: dict[str, Any]) -> str:
    kind, rows, examples = train.get("data_format", "text"), train.get("train_rows"), train.get("train_examples")
    if kind == "text":
        return "text windows" + (f", {rows}" if rows else "")
    packed = f" in {rows} packed rows" if rows and examples and rows < examples else ""
    return f"{examples or rows} {kind} rows{packed}"


def _card_header(report: dict[str, Any], tags: str, title: str, intro: str) -> list[str]:
    return [
        "---",
        "library_name: transformers",
        f"base_model: {report['model']}" if "/" in report["model"] else f"# base model: {report['model']}",
        f"tags: [{tags}, dlp, lora]",
        "---",
        "",
        f"# {report['model']}, {title}",
        "",
        intro,
        "",
    ]


def _fmt_diff(merge: dict) -> str:
    return str(merge["max_logit_diff"]) if merge["max_logit_diff"] is not None else "not checked"


def _export_lines(cfg: dict[str, Any], masks_digest: str) -> list[str]:
    """Where the masks are and which exports the run wrote, with how each loads."""
    dense, sparse = cfg.get("export_dense", True), cfg.get("export_sparse", False)
    values = cfg.get("export_values", "model")
    compressed = (
        f"mask bits + kept values ({'the model dtype' if values == 'model' else values}), loads with "
        "`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (a sparse CPU kernel decodes on it)"
    )
    if not dense:
        return [f"- masks: in the weight file (digest `{masks_digest[:16]}…`); this model is sparse: {compressed}"]
    lines = [f"- masks: `masks.safetensors`, digest `{masks_digest[:16]}…`"]
    if sparse:
        lines.append(f"- `model-sparse/` beside this model holds it sparse: {compressed}")
    return lines


def pruned_finetune_markdown(report: dict[str, Any]) -> str:
    """The model card of a pruned + mask-exact-LoRA model (also the run's ``summary.md``)."""
    cfg, ppl, merge = report["config"], report["perplexity"], report["merge"]
    quant = report.get("quantization")
    any_ppl = ppl["finetuned"]
    lines = [
        *_card_header(
            report,
            "pruned, sparse",
            f"pruned to {100 * report['sparsity']['overall']:.1f}% sparsity and fine-tuned",
            "Pruned with dlp (layerwise sparsity allocation, fixed masks), then fine-tuned with "
            "LoRA adapters whose update was confined to the masks, and merged: every pruned weight is exactly "
            "zero in these files.",
        ),
        "| model | perplexity |",
        "|---|---|",
        f"| dense | {_fmt_ppl(ppl.get('dense'))} |",
        f"| pruned | {_fmt_ppl(ppl.get('pruned'))} |",
        *(
            [
                f"| pruned, 4-bit {quant['bnb_4bit_quant_type'].upper()} (the QLoRA base) | "
                f"{_fmt_ppl(ppl['pruned_4bit'])} |"
            ]
            if "pruned_4bit" in ppl
            else []
        ),
        f"| pruned + mask-exact {'Q' if quant else ''}LoRA (this model) | {_fmt_ppl(any_ppl)} |",
        *(
            [f"| the same, re-quantized to 4-bit (`model-4bit/`) | {_fmt_ppl(ppl['finetuned_4bit'])} |"]
            if "finetuned_4bit" in ppl
            else []
        ),
        *(
            f"| the same, compressed with {v} values (`model-sparse/`) | {_fmt_ppl(ppl[f'finetuned_{v}'])} |"
            for v in ("int8", "int4", "nf4")
            if f"finetuned_{v}" in ppl
        ),
        "",
        f"Perplexity: `{any_ppl['source']}`, {any_ppl['windows']} windows × {any_ppl['seqlen']} tokens.",
        *_chat_lines(report),
        "",
        "## Recipe",
        f"- pruning: criterion **{cfg['criterion']}**, pattern **{cfg['pattern']}**, "
        f"allocation **{cfg['allocation']}**, "
        f"target {100 * cfg['sparsity']:.1f}%; measured {100 * report['sparsity']['overall']:.2f}% of "
        f"{report['sparsity']['weights']:,} decoder weights",
        f"- calibration: {cfg['nsamples']}×{cfg['seqlen']} tokens of `{cfg['calibration_data']}`, seed {cfg['seed']}",
        *_finetune_lines(report),
        *(
            [
                f"- QLoRA: trained on the pruned base quantized to 4-bit {quant['bnb_4bit_quant_type']} (double quant "
                f"{quant['bnb_4bit_use_double_quant']}, compute {quant['bnb_4bit_compute_dtype']}); merged into the "
                + (
                    "full-precision pruned weights"
                    if merge.get("merge_base", "full") == "full"
                    else "dequantized 4-bit weights it was trained on"
                )
            ]
            if quant
            else []
        ),
        f"- merge: W' = (W + s·B·A) ⊙ M; nonzero pruned weights after merge: {merge['violations']}, "
        f"after reloading the export: {report['export']['reloaded_violations']}; max |logit difference| "
        f"adapter vs merged: {_fmt_diff(merge)}",
        *_export_lines(cfg, report["masks_digest"]),
        "",
        "![training loss](loss.png)",
        "",
    ]
    return "\n".join(lines + _layer_table(report))


def sliced_finetune_markdown(report: dict[str, Any]) -> str:
    """The model card of a sliced + LoRA model: how to load it (its own modeling file) and what it cost."""
    cfg, ppl, slicing = report["config"], report["perplexity"], report["slicing"]
    params, any_ppl = slicing["parameters"], ppl["finetuned"]
    lines = [
        *_card_header(
            report,
            "sliced, slicegpt, dynamic-slicing",
            f"sliced by {100 * slicing['mean_fraction']:.1f}% and fine-tuned",
            "Rotated and sliced with dlp (SliceGPT; per-layer widths "
            f"**{cfg['slicing_allocation']}**), then fine-tuned with LoRA and merged. The architecture is in "
            "`modeling_sliced.py`: load with `AutoModelForCausalLM.from_pretrained(path, "
            "trust_remote_code=True)`.",
        ),
        "| model | perplexity |",
        "|---|---|",
        f"| dense | {_fmt_ppl(ppl.get('dense'))} |",
        f"| sliced | {_fmt_ppl(ppl.get('sliced'))} |",
        f"| sliced + LoRA (this model) | {_fmt_ppl(any_ppl)} |",
        "",
        f"Perplexity: `{any_ppl['source']}`, {any_ppl['windows']} windows × {any_ppl['seqlen']} tokens.",
        *_chat_lines(report),
        "",
        "## Recipe",
        f"- slicing: mean {100 * cfg['slicing']:.1f}% of width {slicing['hidden_size']}, allocation "
        f"**{cfg['slicing_allocation']}**"
        + (f" (spread ±{cfg['slicing_spread']})" if cfg["slicing_allocation"] == "lr" else ""),
        f"- parameters {params['sliced']:,} of {params['dense']:,} ({params['ratio']:.3f}×)",
        f"- calibration: {cfg['nsamples']}×{cfg['seqlen']} tokens of `{cfg['calibration_data']}`, seed {cfg['seed']}",
        *_finetune_lines(report),
        f"- merge: W' = W + s·B·A; max |logit difference| adapter vs merged: {_fmt_diff(report['merge'])}",
        "",
        "![training loss](loss.png)",
        "",
        "![per-layer slicing](widths.png)",
        "",
    ]
    return "\n".join(lines)


def slice_markdown(report: dict[str, Any]) -> str:
    """The summary of a slicing run: perplexities, parameter counts and the per-layer widths."""
    cfg, ppl, slicing = report["config"], report["perplexity"], report["slicing"]
    params, any_ppl = slicing["parameters"], ppl["sliced"]
    mapping = cfg.get("slicing_lr_mapping", "minmax")  # reports written before the mapping was a setting: minmax
    allocation = cfg["slicing_allocation"] + (
        f" (spread ±{cfg['slicing_spread']}, {mapping} mapping)" if cfg["slicing_allocation"] == "lr" else ""
    )
    lines = [
        f"# {report['model']}, rotated and sliced",
        "",
        f"- mean slicing {100 * cfg['slicing']:.1f}% of the residual width {slicing['hidden_size']}, allocation "
        f"**{allocation}**; measured mean {100 * slicing['mean_fraction']:.2f}% "
        f"(widths in multiples of {cfg['slicing_multiple']})",
        f"- calibration: {cfg['nsamples']}×{cfg['seqlen']} tokens of `{cfg['calibration_data']}`, seed {cfg['seed']}, "
        f"sha256 `{report['calibration_sha256'][:16]}…`",
        f"- parameters {params['sliced']:,} of {params['dense']:,} (**{params['ratio']:.3f}×**); "
        "without the vocabulary "
        f"matrices {params['sliced_without_embeddings']:,} of {params['dense_without_embeddings']:,} "
        f"({params['ratio_without_embeddings']:.3f}×)",
        "- `model/` loads with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`",
        resources_line(report["timings"], report.get("peak_memory")),
        "",
        "| model | perplexity |",
        "|---|---|",
        f"| dense | {_fmt_ppl(ppl.get('dense'))} |",
        f"| sliced | {_fmt_ppl(any_ppl)} |",
        "",
        f"Perplexity: `{any_ppl['source']}`, {any_ppl['windows']} windows × {any_ppl['seqlen']} tokens.",
        "",
        "| layer | redundancy | fraction | width |",
        "|---|---|---|---|",
    ]
    redundancy = slicing["redundancy"] or [None] * len(slicing["widths"])
    for index, (red, frac, width) in enumerate(zip(redundancy, slicing["measured_fractions"], slicing["widths"])):
        lines.append(f"| {index} | {'—' if red is None else f'{red:.4f}'} | {100 * frac:.1f}% | {width} |")
    return "\n".join(lines + ["", "![per-layer slicing](widths.png)", ""])


def plot_slice_widths(path: Path, report: dict[str, Any]) -> Path:
    cfg, slicing = report["config"], report["slicing"]
    return plot_layer_sparsity(
        path,
        slicing["measured_fractions"],
        cfg["slicing"],
        f"{cfg['slicing_allocation']} slicing: per-layer fraction removed",
        "sliced (%)",
    )


def generic_markdown(report: dict[str, Any]) -> str:
    """The summary of a stage (or card of a fine-tuned model) of a method without views of its own."""
    lines = [f"# {report['model']}, {report.get('method', 'compressed')}", "", "| model | perplexity |", "|---|---|"]
    lines += [f"| {name} | {_fmt_ppl(entry)} |" for name, entry in report["perplexity"].items()]
    recipe = json.dumps(report["config"], indent=1, sort_keys=True, default=str)
    return "\n".join(lines + ["", "## Recipe", "", "```json", recipe, "```", ""])


class View(NamedTuple):
    """How a kind of report is drawn: its Markdown, and a plot (function and file name) or none."""

    markdown: Callable[[dict[str, Any]], str]
    plot: Callable[[Path, dict[str, Any]], Path] | None = None
    plot_name: str = ""


# The views of the built-in methods; each method object carries its own (CompressionMethod.stage_view, card_view)
PRUNE_STAGE_VIEW = View(summary_markdown, plot_report_sparsity, "sparsity.png")
PRUNE_CARD_VIEW = View(pruned_finetune_markdown, plot_report_sparsity, "sparsity.png")
SLICE_STAGE_VIEW = View(slice_markdown, plot_slice_widths, "widths.png")
SLICE_CARD_VIEW = View(sliced_finetune_markdown, plot_slice_widths, "widths.png")
GENERIC_VIEW = View(generic_markdown)


def write_stage_report(output_dir: Path, report: StageReport, view: View = GENERIC_VIEW) -> None:
    """``summary.md`` and the stage's plot (as its method's ``view`` draws them), then ``report.json`` (its presence
    marks the run as finished)."""
    data = report.to_dict()
    if view.plot is not None:
        view.plot(output_dir / view.plot_name, data)
    atomic_write_text(output_dir / "summary.md", view.markdown(data))
    atomic_write_json(output_dir / "report.json", data)


def write_finetune_report(output_dir: Path, model_dir: Path, report: FinetuneReport, view: View = GENERIC_VIEW) -> None:
    """Plots and card (as the compression method's ``view`` draws them) into the run directory and the exported
    model directory; ``report.json`` last."""
    data = report.to_dict()
    logged = [e for e in report.log_history if "loss" in e]
    steps, losses = [e["step"] for e in logged], [e["loss"] for e in logged]
    parts = {name: [e[name] for e in logged] for name in ("lm_loss", "kd_loss") if all(name in e for e in logged)}
    title = "LoRA with distillation: training loss" if report.distillation else "LoRA: training loss"
    plots = [plot_loss(output_dir / "loss.png", steps, losses, title, parts if report.distillation else None)]
    if view.plot is not None:
        plots.insert(0, view.plot(output_dir / view.plot_name, data))
    for plot in plots:  # the card in model/ shows the same images: copy them rather than draw them twice
        atomic_write_bytes(model_dir / plot.name, plot.read_bytes())
    card = view.markdown(data)
    atomic_write_text(model_dir / "README.md", card)
    atomic_write_text(output_dir / "summary.md", card)
    atomic_write_json(output_dir / "report.json", data)  # last: its presence marks the run as finished
