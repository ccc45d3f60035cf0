"""Recipe configuration: flat YAML whose keys are fields of these dataclasses; CLI flags win over the YAML.

Parsing uses trl's ``TrlParser`` (``--config recipe.yaml`` plus ``--field value`` overrides), and the model
fields come from trl's ``ModelConfig`` (``model_name_or_path``, ``dtype``, ``attn_implementation``, LoRA and
4-bit fields), so a pruning recipe and a fine-tuning recipe share their keys. Every value is checked in
``__post_init__``: a bad one raises :class:`~dlp.errors.DlpError` naming the field and the allowed values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .allocate import DLP_STATISTICS, LR_MAPPINGS, SLICING_ALLOCATIONS, parse_layer_sparsities
from .allocators import ALLOCATIONS, ALLOCATORS
from .criteria import CRITERIA, parse_pattern
from .errors import DlpError, require
from .placement import check_memory_setting
from .pruner import check_prune_mode
from .sft_data import TRAIN_FORMATS


MERGE_BASES = ("full", "dequantized")
WAIT_FOR_LOCK_HELP = (
    "If another dlp run is writing into output_dir, wait for it to end (then reuse its result if the recipe is the "
    "same) instead of stopping with an error."
)
# Recipes renamed to one scheme, <allocation>_<criterion or slice>_<percent>[_<recovery>] (2026-11): the old path still
# works, with a deprecation line, when the new file sits where the old one was.
RENAMED_RECIPES = {
    "smollm2-135m/sparsegpt_dlp_70.yaml": "smollm2-135m/dlp_sparsegpt_70.yaml",
    "smollm2-135m/wanda_2of4.yaml": "smollm2-135m/uniform_wanda_2of4.yaml",
    "smollm2-135m/dynslice_25.yaml": "smollm2-135m/lr_slice_25.yaml",
    "smollm2-135m/dynslice_25_lora.yaml": "smollm2-135m/lr_slice_25_lora.yaml",
    "llama-2-7b/dynslice_25_lora.yaml": "llama-2-7b/lr_slice_25_lora.yaml",
}


def require_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    require(value in allowed, f"{name} must be one of {', '.join(allowed)} (got {value!r})")


@dataclass
class CalibrationArguments:
    """The calibration text and how the layer-by-layer sweep reads it; shared by pruning, slicing and evaluation.

    ``seed`` is not a field of its own here: the recipe's one ``seed`` key (the run's, or the trainer's in the
    pipeline) is copied in after parsing, so calibration sampling and training cannot be seeded apart by mistake.
    """

    calibration_data: str = field(
        default="builtin:wikitext2-valid",
        metadata={
            "help": "Calibration text: builtin:wikitext2-valid, a local .txt/.jsonl file, or a HF dataset id "
            "(id or id:config)."
        },
    )
    calibration_split: str = field(default="train", metadata={"help": "Split of a HF dataset to calibrate on."})
    nsamples: int = field(default=32, metadata={"help": "Number of calibration windows (the papers use 128)."})
    seqlen: int = field(default=512, metadata={"help": "Tokens per calibration window (the papers use 2048)."})
    calibration_batch_size: int = field(
        default=8,
        metadata={"help": "Windows per layer call (a speed/memory knob; fast mode uses all windows at once)."},
    )
    device: str = field(
        default="auto", metadata={"help": "Compute device for the sweep and evaluation: auto, cpu, cuda, cuda:N."}
    )
    calibration_memory: str = field(
        default="auto",
        metadata={
            "help": "Device memory the sweep may hold calibration hidden states in: auto (80 percent of what is free, "
            "within a per-process cap), a size in GiB, or host (park them in pinned host memory). No effect on CPU."
        },
    )
    seed: int = field(default=0, init=False)  # set from the recipe's seed after parsing (see the class docstring)

    def __post_init__(self) -> None:
        require(self.nsamples >= 1, f"nsamples must be >= 1 (got {self.nsamples})")
        require(self.seqlen >= 2, f"seqlen must be >= 2 (got {self.seqlen})")
        require(
            self.calibration_batch_size >= 1, f"calibration_batch_size must be >= 1 (got {self.calibration_batch_size})"
        )
        check_memory_setting(self.calibration_memory)

    def seeded(self, seed: int) -> "CalibrationArguments":
        """These settings with the run's seed (the one ``seed`` key of the recipe)."""
        self.seed = seed
        return self


@dataclass
class PruneArguments:
    """How much to prune, where (the layerwise allocation) and how (criterion, pattern, mode)."""

    # --- sparsity and its layerwise allocation
    sparsity: float = field(default=0.7, metadata={"help": "Target sparsity of the decoder Linears, in [0, 1)."})
    allocation: str = field(default="dlp", metadata={"help": f"Layerwise allocation: {', '.join(ALLOCATIONS)}."})
    dlp_alpha: float = field(default=0.15, metadata={"help": "DLP: layer sparsities span target ± alpha."})
    dlp_statistic: str = field(
        default="median", metadata={"help": "DLP layer score: median of Wanda scores (paper) or mean (released code)."}
    )
    owl_m: float = field(default=5.0, metadata={"help": "OWL: a score above M × mean is an outlier."})
    owl_lambda: float = field(default=0.08, metadata={"help": "OWL: layer sparsities span target ± lambda."})
    lr_spread: float = field(default=0.1, metadata={"help": "LR: layer sparsities span target ± spread."})
    layer_sparsities: str | None = field(
        default=None,
        metadata={
            "help": "allocation=explicit: comma-separated sparsities in [0, max_layer_sparsity], one per layer, or a "
            "JSON file with a list. The overall target is then their weighted mean (sparsity is not used)."
        },
    )
    max_layer_sparsity: float = field(default=0.99, metadata={"help": "Upper clip for any layer's sparsity."})
    # --- allocation: search (dlp/search.py)
    search_generations: int = field(default=200, metadata={"help": "search: generations at most."})
    search_time_budget: float = field(
        default=0.0, metadata={"help": "search: seconds of search at most (across resumes); 0 = no limit."}
    )
    search_offspring: int = field(default=16, metadata={"help": "search: mutants per generation."})
    search_survivors: str = field(
        default="4,1", metadata={"help": "search: survivors after each selection stage, comma-separated, ending at 1."}
    )
    search_tokens: str = field(
        default="1024,8192",
        metadata={"help": "search: calibration tokens per selection stage (rounded up to whole windows)."},
    )
    search_step: float = field(
        default=0.01, metadata={"help": "search: one level moves this fraction of a mean layer's weights."}
    )
    search_levels: int = field(default=25, metadata={"help": "search: levels either side of the target, per layer."})
    search_topk: int = field(default=128, metadata={"help": "search: dense top-k tokens kept for the KL fitness."})
    search_max_swaps: int = field(default=3, metadata={"help": "search: one-level swaps per mutation, at most."})
    search_precision: str = field(
        default="auto",
        metadata={"help": "search: forwards in bf16 autocast or float32; auto = bf16 where the device has bf16 units."},
    )
    # --- criterion and pattern
    criterion: str = field(default="wanda", metadata={"help": f"Pruning criterion: {', '.join(CRITERIA)}."})
    pattern: str = field(
        default="unstructured",
        metadata={
            "help": "unstructured (per output row) or N:M, e.g. 2:4 (keep N of every M inputs; fixes sparsity at "
            "1-N/M)."
        },
    )
    sparsegpt_blocksize: int = field(default=128, metadata={"help": "SparseGPT: columns per block."})
    sparsegpt_percdamp: float = field(
        default=0.01, metadata={"help": "SparseGPT: dampening, fraction of mean diag(H)."}
    )
    prune_mode: str = field(
        default="sequential",
        metadata={
            "help": "sequential (the papers' protocol: layer l+1 calibrated on the pruned layer l); fast (one dense "
            "sweep gives both the ratios and the pruning statistics; wanda/magnitude); onepass (one forward "
            "per layer, each Linear pruned as soon as its whole-batch input is known; any criterion)."
        },
    )

    def __post_init__(self) -> None:
        require_choice("allocation", self.allocation, tuple(ALLOCATORS))
        require_choice("dlp_statistic", self.dlp_statistic, DLP_STATISTICS)
        require_choice("criterion", self.criterion, tuple(CRITERIA))
        check_prune_mode(self.criterion, self.prune_mode)
        require(0.0 <= self.sparsity < 1.0, f"sparsity must be in [0, 1) (got {self.sparsity})")
        require(
            0.0 < self.max_layer_sparsity < 1.0, f"max_layer_sparsity must be in (0, 1) (got {self.max_layer_sparsity})"
        )
        for name in ("dlp_alpha", "owl_lambda", "lr_spread"):
            require(0.0 <= getattr(self, name) < 0.5, f"{name} must be in [0, 0.5) (got {getattr(self, name)})")
        require(self.owl_m > 0, f"owl_m must be > 0 (got {self.owl_m})")
        require(
            self.allocation != "explicit" or self.layer_sparsities,
            "allocation=explicit needs layer_sparsities (comma-separated floats or a JSON file)",
        )
        if self.allocation == "explicit":  # values and file now; their count once the model's config is read
            parse_layer_sparsities(self.layer_sparsities, self.max_layer_sparsity)
        else:
            require(
                self.sparsity <= self.max_layer_sparsity,
                f"max_layer_sparsity ({self.max_layer_sparsity}) must "
                f"be >= sparsity ({self.sparsity}): no layer could go above it, so the mean cannot reach it",
            )
        if self.allocation == "search":
            self._check_search()
        pattern = parse_pattern(self.pattern)
        if pattern.is_nm:
            # N:M exists for sparse tensor cores, which run one fixed N:M; a per-layer N would need per-layer kernels.
            require(
                self.allocation == "uniform",
                f"pattern {self.pattern} fixes every layer at {pattern.sparsity:.0%} "
                f"sparsity, so allocation must be uniform (got {self.allocation!r})",
            )
            require(
                abs(self.sparsity - pattern.sparsity) < 1e-9,
                f"pattern {self.pattern} removes exactly "
                f"{pattern.sparsity:g} of the weights: set sparsity: {pattern.sparsity:g} (got {self.sparsity})",
            )

    def _check_search(self) -> None:
        from .search import MAX_LEVELS, SearchPlan

        for name in ("search_generations", "search_offspring", "search_topk", "search_max_swaps", "search_levels"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1 (got {getattr(self, name)})")
        require(
            2 * self.search_levels + 1 <= MAX_LEVELS,
            f"search_levels must be at most {(MAX_LEVELS - 1) // 2} (got {self.search_levels})",
        )
        require(0.0 < self.search_step <= 0.1, f"search_step must be in (0, 0.1] (got {self.search_step})")
        require(self.search_time_budget >= 0, f"search_time_budget must be >= 0 (got {self.search_time_budget})")
        SearchPlan.from_settings(self).check()


@dataclass
class SliceArguments:
    """Rotate-and-slice (SliceGPT) with uniform or Layer-Redundancy-driven per-layer widths (Dynamic Slicing).

    Calibration comes from :class:`CalibrationArguments`, as for pruning.
    """

    slicing: float = field(
        default=0.25, metadata={"help": "Mean fraction of the residual-stream width removed per layer, in [0, 1)."}
    )
    slicing_allocation: str = field(
        default="lr",
        metadata={
            "help": f"Per-layer fractions: {', '.join(SLICING_ALLOCATIONS)} (lr: Layer Redundancy, Dynamic Slicing)."
        },
    )
    slicing_spread: float = field(
        default=0.1,
        metadata={"help": "lr: layer fractions span slicing ± spread (the most redundant layer is sliced most)."},
    )
    slicing_lr_mapping: str = field(
        default="minmax",
        metadata={
            "help": "lr: how redundancy scores become fractions: minmax (linear in the scores, over slicing ± spread), "
            "rank (linear in their order: one outlier layer no longer takes the whole spread) or ratio (the released "
            "Dynamic Slicing code's: slicing − spread + spread · r / mean(r), r the min-max scaled scores)."
        },
    )
    slicing_multiple: int = field(default=8, metadata={"help": "Every sliced width is a multiple of this."})

    def __post_init__(self) -> None:
        require_choice("slicing_allocation", self.slicing_allocation, SLICING_ALLOCATIONS)
        require_choice("slicing_lr_mapping", self.slicing_lr_mapping, tuple(LR_MAPPINGS))
        require(0.0 <= self.slicing < 1.0, f"slicing must be in [0, 1) (got {self.slicing})")
        require(0.0 <= self.slicing_spread < 0.5, f"slicing_spread must be in [0, 0.5) (got {self.slicing_spread})")
        require(
            self.slicing_spread <= self.slicing or self.slicing_allocation == "uniform",
            f"slicing_spread ({self.slicing_spread}) must not exceed slicing ({self.slicing}): "
            "no layer can be sliced by less than 0",
        )
        require(self.slicing_multiple >= 1, f"slicing_multiple must be >= 1 (got {self.slicing_multiple})")


@dataclass
class EvalArguments:
    """Perplexity (standard protocol) and optional lm-eval zero-shot tasks."""

    eval_data: str = field(
        default="builtin:wikitext2-test",
        metadata={
            "help": "Perplexity text: builtin:wikitext2-test, a local file, or a HF dataset id. Never the calibration "
            "split."
        },
    )
    eval_seqlen: int = field(default=512, metadata={"help": "Tokens per perplexity window (papers: 2048)."})
    eval_max_windows: int = field(default=64, metadata={"help": "Evaluate the first N windows; 0 = the whole split."})
    eval_batch_size: int = field(default=1, metadata={"help": "Windows per forward during evaluation."})
    eval_dense: bool = field(
        default=True, metadata={"help": "Also measure the dense model's perplexity, for the report."}
    )
    eval_tasks: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated lm-eval zero-shot tasks (needs `pip install dlp[eval]` and the tasks' datasets)."
        },
    )

    def __post_init__(self) -> None:
        require(self.eval_seqlen >= 2, f"eval_seqlen must be >= 2 (got {self.eval_seqlen})")
        require(self.eval_max_windows >= 0, f"eval_max_windows must be >= 0 (got {self.eval_max_windows})")
        require(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1 (got {self.eval_batch_size})")

    @property
    def max_windows(self) -> int | None:
        return self.eval_max_windows or None


EXPORT_VALUES = ("model", "int8", "int4", "nf4")
EXPORT_GROUP_SIZES = (0, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class SparseValuesArguments:
    """How the sparse checkpoint stores its kept values: as the model's dtype (reloads bitwise equal to the dense
    export) or quantized, with one step per row and group of columns."""

    export_values: str = field(
        default="model",
        metadata={
            "help": "Kept values of the sparse export: model (its dtype: reloads bitwise equal to the dense "
            "export), int8, int4 or nf4 (4-bit NormalFloat), with one step per group of columns."
        },
    )
    export_group_size: int = field(
        default=128,
        metadata={"help": "Columns per quantization step: 32 to 4096, a power of 2; int8 and int4 also 0 (a row)."},
    )

    def __post_init__(self) -> None:
        require_choice("export_values", self.export_values, EXPORT_VALUES)
        sizes = EXPORT_GROUP_SIZES if self.export_values != "nf4" else EXPORT_GROUP_SIZES[1:]
        require(
            self.export_group_size in sizes,
            f"export_group_size must be one of {', '.join(map(str, sizes))} for {self.export_values} values "
            f"(got {self.export_group_size})",
        )


@dataclass
class ExportArguments(SparseValuesArguments):
    """What a pruned model is exported as: dense (``model/``, zeros included: loads anywhere, the original's size)
    and sparse (``model-sparse/``: mask bits + kept values, a fraction of the size and a faster CPU decode). Both by
    default: the dense copy is what every other tool and a later fine-tune read, the sparse one is what a user
    deploys, and writing it costs seconds. A sliced model is smaller already and is exported dense only."""

    export_dense: bool = field(
        default=True,
        metadata={"help": "Write model/ dense, with zeros in place (loads with plain transformers)."},
    )
    export_sparse: bool = field(
        default=True,
        metadata={
            "help": "Write the sparse checkpoint (mask bits + kept values; loads with trust_remote_code=True): "
            "model-sparse/ beside model/, or model/ itself with export_dense false."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.export_dense or self.export_sparse,
            "export_dense and export_sparse are both false: set one of them true (nothing would be exported)",
        )


@dataclass
class FinetuneArguments(ExportArguments):
    """The fine-tuning data and what the prune-then-finetune pipeline keeps (training itself: trl's SFTConfig)."""

    method: str = field(
        default="prune",
        metadata={"help": "What is done before fine-tuning: prune (masks; pruning fields) or slice (slicing fields)."},
    )
    train_data: str = field(
        default="builtin:wikitext2-valid",
        metadata={
            "help": "Fine-tuning data: builtin:wikitext2-valid, a local .txt/.jsonl/.json/.parquet file, a HF dataset "
            "id (id or id:config), or selfgen:<prompts>: the dense model's answers to builtin:wikitext2-prompts or "
            "to the prompts of a local file."
        },
    )
    train_format: str = field(
        default="auto",
        metadata={
            "help": "Format of train_data: auto (detected from its columns, as trl does), text (windows of raw text), "
            "prompt-completion or messages (rows trl templates, tokenizes and masks)."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split of a HF dataset to fine-tune on."})
    train_max_windows: int = field(
        default=0,
        metadata={"help": "Text: use at most N windows of max_length tokens (consecutive, from the start); 0 = all."},
    )
    train_max_rows: int = field(
        default=0, metadata={"help": "Rows (prompt-completion, messages): use the first N rows only; 0 = all."}
    )
    prune_dir: str | None = field(
        default=None,
        metadata={
            "help": "Reuse a finished train/prune.py run (its masks.safetensors and model/) instead of pruning again."
        },
    )
    slice_dir: str | None = field(
        default=None,
        metadata={"help": "method slice: reuse a finished train/slice.py run (its model/) instead of slicing again."},
    )
    check_merge: bool = field(
        default=True,
        metadata={
            "help": "After merging, compare the merged model's logits with the adapter model's on a few windows."
        },
    )
    merge_base: str = field(
        default="full",
        metadata={
            "help": f"4-bit (load_in_4bit) runs: merge into the full-precision pruned weights (full, the default) or "
            f"into the dequantized 4-bit weights the adapter was trained on (dequantized). One of "
            f"{', '.join(MERGE_BASES)}."
        },
    )
    export_4bit: bool = field(
        default=False,
        metadata={"help": "Also write model-4bit/: the merged sparse model re-quantized to 4-bit (bnb_4bit_* fields)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Start over even if output_dir holds a (partial) run."})
    wait_for_lock: bool = field(default=False, metadata={"help": WAIT_FOR_LOCK_HELP})

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.train_max_windows >= 0, f"train_max_windows must be >= 0 (got {self.train_max_windows})")
        require(self.train_max_rows >= 0, f"train_max_rows must be >= 0 (got {self.train_max_rows})")
        require_choice("train_format", self.train_format, TRAIN_FORMATS)
        require_choice("merge_base", self.merge_base, MERGE_BASES)
        require(
            not (self.prune_dir and self.slice_dir),
            "prune_dir and slice_dir cannot both be set: a run reuses the finished stage of its own method "
            "(prune_dir for method prune, slice_dir for method slice); remove one",
        )
        # ``method`` is checked against the registry where it is looked up (dlp.stages.get_method), at the start of
        # the run: checking it here too would make this module import the stages, which import it.


TEACHER_MODES = ("online", "cached")


@dataclass
class DistillationArguments:
    """Recovery with a teacher: the loss becomes (1 − w)·LM + w·T²·KL(teacher ‖ student) (see dlp/distill.py)."""

    teacher: str = field(
        default="none",
        metadata={
            "help": "none (plain LM loss), dense (the model this run compresses, before compression) or a model id / "
            "directory with the same tokenizer."
        },
    )
    teacher_mode: str = field(
        default="online",
        metadata={
            "help": "online: the teacher runs beside the student on every batch; cached: its top-k log-probabilities "
            "for every training window are computed once into output_dir/teacher/ (training then holds no teacher)."
        },
    )
    distill_weight: float = field(default=0.5, metadata={"help": "w: the KL term's share of the loss, in [0, 1]."})
    distill_temperature: float = field(default=1.0, metadata={"help": "T: softmax temperature of both sides, > 0."})
    distill_top_k: int = field(
        default=128, metadata={"help": "cached mode: teacher log-probabilities kept per position (the rest: one tail)."}
    )

    def __post_init__(self) -> None:
        require_choice("teacher_mode", self.teacher_mode, TEACHER_MODES)
        require(0.0 <= self.distill_weight <= 1.0, f"distill_weight must be in [0, 1] (got {self.distill_weight})")
        require(self.distill_temperature > 0, f"distill_temperature must be > 0 (got {self.distill_temperature})")
        require(self.distill_top_k >= 1, f"distill_top_k must be >= 1 (got {self.distill_top_k})")
        require(self.teacher.strip() != "", "teacher must be none, dense or a model id or directory (got '')")

    @property
    def enabled(self) -> bool:
        return self.teacher != "none"

    def teacher_id(self, model_id: str) -> str:
        """The teacher's model id or directory (``dense``: the model the run compresses)."""
        return model_id if self.teacher == "dense" else self.teacher


CHAT_EVAL_MODES = ("auto", "true", "false")
SAMPLING = ("greedy", "sample")


@dataclass
class ChatArguments:
    """Self-generated training data (``train_data: selfgen:<prompts>``) and the chat evaluation: both ask the dense
    model, before compression, to answer chat prompts (:mod:`dlp.selfgen`, :mod:`dlp.chat_eval`)."""

    selfgen_prompts: int = field(default=1024, metadata={"help": "selfgen: prompts answered (the first N of the set)."})
    selfgen_max_new_tokens: int = field(default=128, metadata={"help": "selfgen: tokens per answer, at most."})
    selfgen_sampling: str = field(
        default="greedy", metadata={"help": "selfgen: greedy answers, or sample (temperature, top_p, the run's seed)."}
    )
    selfgen_temperature: float = field(default=0.7, metadata={"help": "selfgen: sampling temperature, > 0."})
    selfgen_top_p: float = field(default=0.9, metadata={"help": "selfgen: nucleus sampling mass, in (0, 1]."})
    selfgen_batch_size: int = field(default=16, metadata={"help": "selfgen and chat_eval: prompts per generate call."})
    chat_eval: str = field(
        default="auto",
        metadata={
            "help": "Score the dense model's greedy answers to held-out prompts with the dense, compressed and "
            "fine-tuned models (answer perplexity, greedy match): true, false, or auto (when the tokenizer has a "
            "chat template)."
        },
    )
    chat_eval_data: str = field(
        default="builtin:wikitext2-heldout-prompts",
        metadata={"help": "Held-out prompts: builtin:wikitext2-heldout-prompts or a local .jsonl/.json/.parquet file."},
    )
    chat_eval_prompts: int = field(default=64, metadata={"help": "Held-out prompts scored (the first N)."})
    chat_eval_max_new_tokens: int = field(default=128, metadata={"help": "Tokens per reference answer, at most."})
    chat_eval_examples: int = field(
        default=3, metadata={"help": "Held-out prompts whose greedy answers summary.md shows side by side."}
    )

    def __post_init__(self) -> None:
        require_choice("chat_eval", str(self.chat_eval).lower(), CHAT_EVAL_MODES)
        self.chat_eval = str(self.chat_eval).lower()
        require_choice("selfgen_sampling", self.selfgen_sampling, SAMPLING)
        for name in ("selfgen_prompts", "selfgen_max_new_tokens", "selfgen_batch_size", "chat_eval_prompts"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1 (got {getattr(self, name)})")
        require(self.chat_eval_max_new_tokens >= 1, "chat_eval_max_new_tokens must be >= 1")
        require(self.chat_eval_examples >= 0, f"chat_eval_examples must be >= 0 (got {self.chat_eval_examples})")
        require(self.selfgen_temperature > 0, f"selfgen_temperature must be > 0 (got {self.selfgen_temperature})")
        require(0 < self.selfgen_top_p <= 1, f"selfgen_top_p must be in (0, 1] (got {self.selfgen_top_p})")


@dataclass
class RunArguments:
    """Where results go (``train/prune.py``; the fine-tuning script takes these from its training arguments)."""

    output_dir: str = field(default="outputs/prune", metadata={"help": "Directory for masks, model and report."})
    seed: int = field(
        default=0,
        metadata={"help": "Seed for calibration sampling (same seed, same masks); 0 in every dlp script by default."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Start over even if output_dir holds a finished run."})
    wait_for_lock: bool = field(default=False, metadata={"help": WAIT_FOR_LOCK_HELP})
    save_model: bool = field(default=True, metadata={"help": "Save the pruned model (safetensors) besides the masks."})


def check_no_training_quantization(model_args, script: str) -> None:
    """``load_in_4bit``/``load_in_8bit`` are training settings (a QLoRA base in ``train/prune_lora.py``): the
    compression scripts prune and slice the full-precision model, so the flags would be silently ignored there."""
    for name in ("load_in_4bit", "load_in_8bit"):
        require(
            not getattr(model_args, name, False),
            f"{name}: {script} compresses the full-precision model and has no 4- or 8-bit mode; a 4-bit (QLoRA) "
            f"base is a training setting of train/prune_lora.py: set {name} false here",
        )


def parse_config(
    dataclass_types: Sequence[type], argv: Sequence[str] | None = None, defaults: Sequence[tuple[str, str, str]] = ()
) -> tuple:
    """Parse ``--config recipe.yaml`` plus CLI overrides into the given dataclasses (user errors: DlpError).

    ``defaults`` are ``(--field, value, note)``: the value applies unless the command line or the recipe sets the
    field, and the note (if any) is printed when it does. Every mistake (YAML syntax, a value of the wrong type, an
    unknown key, a bad flag) becomes one line naming the field or file, instead of argparse's usage dump or a
    traceback.
    """
    import sys

    from trl import TrlParser

    from .cli import one_line_parse_errors

    argv = list(argv) if argv is not None else sys.argv[1:]
    parser = TrlParser(list(dataclass_types))
    one_line_parse_errors(parser)
    recipe: dict = {}
    if "--config" in argv:
        index = argv.index("--config")
        require(index + 1 < len(argv), "--config needs a recipe file")
        argv[index + 1] = renamed_recipe(argv[index + 1])
        recipe = _check_recipe(parser, argv[index + 1])
    for flag, value, note in defaults:
        if flag not in argv and flag.lstrip("-") not in recipe:
            argv += [flag, value]
            if note and os.environ.get("RANK", "0") == "0" and not {"-h", "--help"} & set(argv):  # once per run
                print(f"[dlp] {note}")
    try:
        return parser.parse_args_and_config(args=argv)
    except DlpError:
        raise
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise DlpError(f"config: {str(exc).splitlines()[0]}")


def renamed_recipe(path: str) -> str:
    """``path``, or the recipe it was renamed to (with a deprecation line) when only the new name exists."""
    old = Path(path)
    new_name = RENAMED_RECIPES.get(f"{old.parent.name}/{old.name}")
    if old.exists() or new_name is None or not (old.parent.parent / new_name).is_file():
        return path
    new = str(old.parent.parent / new_name)
    if os.environ.get("RANK", "0") == "0":
        print(f"[dlp] deprecated: recipe {path} was renamed {new}; using it (the old name goes in a later release)")
    return new


def _unique_key_loader():
    """A safe YAML loader that refuses a mapping key given twice (the plain loader keeps the last value silently:
    a recipe with ``sparsity`` twice would run at whichever came last)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise DlpError(f"config: {self.name} gives {key!r} twice (lines {seen[key]} and {line}); keep one")
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _check_recipe(parser, path: str) -> dict:
    """The recipe file must be a readable YAML mapping, each key given once, whose values have the types their
    fields take."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            recipe = yaml.load(handle, Loader=_unique_key_loader())  # noqa: S506 (a SafeLoader subclass)
    except OSError as exc:
        raise DlpError(f"config: cannot read {path} ({exc.strerror or type(exc).__name__})")
    except UnicodeDecodeError:
        raise DlpError(f"config: {path} is not UTF-8 text")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise DlpError(f"config: {path} is not valid YAML{where} ({getattr(exc, 'problem', None) or exc})")
    require(
        isinstance(recipe, dict),
        f"config: {path} must be a YAML mapping of field: value (got a {type(recipe).__name__})",
    )
    # the ``--field`` action of each field: a bool field also has a ``--no_field`` action with the same dest
    actions = {action.dest: action for action in parser._actions if f"--{action.dest}" in action.option_strings}
    for key, value in recipe.items():
        action = actions.get(key)
        if action is None or value is None:
            continue  # unknown keys are reported by the parser
        if isinstance(value, str):  # argparse converts (and checks) a string default's type, but not its choices
            choices = [str(c) for c in action.choices] if action.choices is not None else None
            require(
                choices is None or value in choices,
                f"config: {key} must be one of {', '.join(choices or [])} (got {value!r})",
            )
            continue
        _check_value(key, value, action)
    return recipe


def _check_value(key: str, value, action) -> None:
    """argparse converts only string defaults, so a YAML number, list or mapping must already fit its field."""
    if action.nargs not in (None, "?"):  # list fields
        require(isinstance(value, list), f"config: {key} must be a list (got {value!r})")
        return
    require(not isinstance(value, (list, dict)), f"config: {key} takes a single value (got {value!r})")
    kind = action.type
    if kind is int:
        require(
            isinstance(value, int) and not isinstance(value, bool), f"config: {key} must be an integer (got {value!r})"
        )
    elif kind is float:
        require(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            f"config: {key} must be a number (got {value!r})",
        )
    elif getattr(kind, "__name__", "") == "string_to_bool":
        require(isinstance(value, bool), f"config: {key} must be true or false (got {value!r})")
    if action.choices is not None:
        require(
            value in action.choices,
            f"config: {key} must be one of {', '.join(map(str, action.choices))} (got {value!r})",
        )
