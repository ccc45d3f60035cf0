"""Prune-then-finetune: prune → finetune → merge → export → evaluate, one recipe, every stage resumable.

Layout of ``output_dir`` (each artifact is written atomically; its presence marks its stage finished):

* ``<method>/``: the compression stage, e.g. ``prune/`` (a ``train/prune.py`` run: masks, pruned model,
  dense/pruned perplexity) or ``slice/`` (a ``train/slice.py`` run: the sliced model); or a finished run of that
  script reused (``prune_dir``, ``slice_dir``);
* ``finetune/checkpoint-N``: trainer checkpoints, resumed from after an interruption;
* ``adapter/``: the trained mask-exact LoRA adapter and its training log;
* ``model/`` then ``merge.json``: the merged sparse model (loads with plain transformers) and its masks; with
  ``export_sparse`` (the default) also ``model-sparse/``, the same model as mask bits plus kept values
  (:mod:`dlp.compress`; loads with ``trust_remote_code=True``); with ``export_dense: false``, ``model/`` is that one;
* ``eval.json``: perplexity of the exported model, reloaded without dlp;
* ``report.json``, ``summary.md``, ``sparsity.png``, ``loss.png`` and the model card ``model/README.md``;
  ``report.json`` comes last and marks the whole run finished.

Under ``accelerate launch`` with several processes, pruning, merging and evaluation run on the main process
(the others wait at a barrier and then load its results); training runs on every process (DDP, or DeepSpeed
ZeRO-2/3, whose partitioned loading keeps a large base from ever being whole on one rank), and every rank checks
that it holds the same masks before it trains.

What differs between compression methods (masks or none, LoRA targets, merge tolerance, remote code, report
section) is asked of the method's object (:mod:`dlp.stages`); this module never looks at the method's name.

A ``load_in_4bit`` recipe trains the adapter on the pruned base quantized to 4-bit (QLoRA); ``merge_base`` picks
what it is merged into, and ``export_4bit`` adds ``model-4bit/``, the merged model re-quantized.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .chat import (
    chat_eval_on,
    chat_evaluation,
    check_chat_settings,
    dense_answers_stage,
    generation_seconds,
    selfgen_rows,
)
from .config import (
    CalibrationArguments,
    ChatArguments,
    DistillationArguments,
    EvalArguments,
    FinetuneArguments,
    RunArguments,
)
from .data import load_training_windows
from .distributed import check_same_masks, describe_zero3_shards, zero3_enabled, zero3_init_disabled
from .errors import DlpError, require
from .evaluate import perplexity
from .finetune import train
from .lora import check_lora_args, masked_lora_model
from .rundir import (
    NOT_RECIPE,
    TEMP_PREFIX,
    RunLock,
    atomic_write_json,
    claim_dir,
    mark_dir,
    read_json,
    recipe_changes,
    start_output_dir,
)
from .masks import MaskSet
from .merge import (
    BINDING_FILE,
    QUANTIZATION_FILE,
    adapter_binding,
    load_adapter_model,
    merge_masked,
)
from .compress import compressed_dir, export_formats
from .compressed import is_compressed_checkpoint
from .export import export_quantized
from .modeling import load_model_and_tokenizer
from .preflight import ModelPlan, check_lora_targets, check_teacher
from .process import resolve_device, seed_all, setup
from .quantize import bnb_config, check_quantization_args, keep_canonical_4bit_layout, prepare_4bit_for_training
from .report import write_finetune_report
from .report_schema import FinetuneReport, StageReport
from .teachers import recovery_teacher, teacher_summary
from .resources import peak_memory, timed
from .sft_data import check_chat_template, is_selfgen, load_rows_source
from .stages import CompressionMethod, get_method
from .stages.base import finished_report

TRAINING_FIELDS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "weight_decay",
    "activation_checkpointing",
    "bf16",
    "seed",
    "packing",
    "packing_strategy",
    "padding_free",
    "completion_only_loss",
    "assistant_only_loss",
    "truncation_mode",
)


def run_prune_lora(
    model_args,
    calib_args: CalibrationArguments,
    method_args: dict[str, Any],
    eval_args: EvalArguments,
    ft_args: FinetuneArguments,
    sft_args,
    distill_args: DistillationArguments | None = None,
    chat_args: ChatArguments | None = None,
) -> FinetuneReport:
    """Run (or resume) the whole pipeline into ``sft_args.output_dir``; return the final report.

    ``method_args``: each compression method's parsed arguments by method name (only ``ft_args.method``'s are
    used); ``calib_args.seed`` is set from the trainer's seed, the recipe's one ``seed``."""
    from accelerate import PartialState

    state = PartialState()  # already set up by the training arguments (see process.use_cpu_without_accelerator)
    out = Path(sft_args.output_dir)
    method = get_method(ft_args.method)
    margs = method_args[method.name]
    calib_args.seeded(sft_args.seed)
    setup(sft_args.seed)  # also for a run that reuses a finished stage, which skips the stage's own setup
    distill_args, chat_args = distill_args or DistillationArguments(), chat_args or ChatArguments()
    _check_training_settings(model_args, method, eval_args, ft_args, sft_args)
    recipe = _recipe(model_args, method, calib_args, margs, eval_args, ft_args, sft_args, distill_args, chat_args)
    finished = _finished_run(out, recipe, ft_args.overwrite, state.is_main_process)
    if finished is not None:
        return FinetuneReport.from_dict(finished)
    _check_resumable(out, recipe, ft_args.overwrite)  # before anything is written, the lock file included
    plan = _check_pipeline_settings(model_args, method, calib_args, margs, eval_args, ft_args, sft_args, chat_args)
    if distill_args.enabled and distill_args.teacher != "dense":
        check_teacher(plan, distill_args.teacher)
    # only the main process writes the run's files, so only it takes the directory's lock
    with RunLock(out, ft_args.wait_for_lock) as lock:
        if state.is_main_process:
            start_output_dir(out, ft_args.overwrite, lock=lock)
        state.wait_for_everyone()
        finished = _finished_run(out, recipe, False, announce=False)  # a run this one waited for may have finished
        if finished is not None:
            return FinetuneReport.from_dict(finished)
        _claim_output_dir(out, recipe, state)
        settings = (model_args, method, calib_args, margs, eval_args, ft_args, sft_args, distill_args, chat_args)
        return _run_stages(*settings, state)


def _run_stages(
    model_args,
    method: CompressionMethod,
    calib_args,
    margs,
    eval_args,
    ft_args,
    sft_args,
    distill_args,
    chat_args,
    state,
) -> FinetuneReport:
    """Compress, fine-tune, merge, export and evaluate, each stage skipped if an earlier run in this (locked) output
    directory finished it; return the final report."""
    out = Path(sft_args.output_dir)
    stage_dir, stage_report = _compress_stage(
        method,
        lambda run_args: method.run(model_args, calib_args, margs, eval_args, run_args),
        getattr(ft_args, method.reuse_field or "", None),
        sft_args.seed,
        out,
        state,
    )
    masks = method.masks(stage_dir)
    if masks is not None:
        check_same_masks(masks.digest(), state)
    trained = (out / "adapter" / "adapter_config.json").is_file()
    chat = chat_eval_on(chat_args, _tokenizer(stage_dir / "model"))
    rows, refs = is_selfgen(ft_args.train_data) and not trained, chat and not (out / "eval.json").is_file()
    device = resolve_device(calib_args.device)
    dense_answers_stage(model_args, ft_args, chat_args, sft_args.seed, out, device, state, rows, refs)
    if not trained:
        distillation = recovery_teacher(model_args, calib_args, distill_args, out, state)
        data = _training_data(ft_args, chat_args, out)
        _finetune_stage(model_args, method, ft_args, sft_args, stage_dir, masks, out, state, data, distillation)
    if state.is_main_process:
        with zero3_init_disabled():
            _merge_export_evaluate(
                model_args,
                method,
                calib_args,
                eval_args,
                ft_args,
                sft_args,
                stage_dir,
                stage_report,
                masks,
                out,
                teacher_summary(model_args, distill_args, out),
                chat_args if chat else None,
            )
    state.wait_for_everyone()
    return FinetuneReport.from_dict(read_json(out / "report.json"))


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _training_data(ft_args, chat_args, out: Path):
    """The checked training source: the self-generated rows, or ``train_data`` read in its format."""
    if is_selfgen(ft_args.train_data):
        return selfgen_rows(ft_args, chat_args, out)
    return load_rows_source(ft_args.train_data, ft_args.train_split, ft_args.train_format, ft_args.train_max_rows)


def _check_training_settings(model_args, method: CompressionMethod, eval_args, ft_args, sft_args) -> None:
    """The fine-tuning settings that need nothing but the recipe."""
    require(ft_args.train_data != eval_args.eval_data, "train_data must not be the evaluation text (eval_data)")
    require(
        sft_args.max_length is not None and sft_args.max_length >= 2,
        "max_length must be >= 2 (tokens per training window)",
    )
    check_lora_args(model_args)
    check_quantization_args(model_args)
    require(
        ft_args.merge_base == "full" or model_args.load_in_4bit,
        "merge_base dequantized needs load_in_4bit: true (a full-precision base has nothing to dequantize)",
    )
    require(
        not (model_args.load_in_4bit and zero3_enabled()),
        "load_in_4bit is not supported under ZeRO-3 here; "
        "train QLoRA with accelerate_configs/ddp.yaml or deepspeed_zero2.yaml",
    )
    require(
        ft_args.export_dense or method.compressible,
        f"export_dense: false needs masks (method prune); method {method.name}'s model is exported dense",
    )
    require(
        not (ft_args.export_4bit and not ft_args.export_dense),
        "export_4bit re-quantizes the dense export: set export_dense true with it",
    )
    if model_args.load_in_4bit and not method.supports_4bit:
        from .stages import METHODS

        raise DlpError(
            f"load_in_4bit is supported with method {', '.join(n for n, m in METHODS.items() if m.supports_4bit)} "
            f"only (got method {method.name})"
        )


def _check_pipeline_settings(
    model_args, method: CompressionMethod, calib_args, margs, eval_args, ft_args, sft_args, chat_args
) -> ModelPlan:
    """Every check that needs the model's config but not its weights, before any stage runs (see preflight.py)."""
    plan = method.check_settings(model_args, calib_args, margs, eval_args, max_length=sft_args.max_length)
    check_lora_targets(plan, model_args.lora_target_modules)
    reuse = getattr(ft_args, method.reuse_field or "", None)
    if reuse:
        method.check_reuse(plan, Path(reuse))
    _check_data(model_args, ft_args, sft_args, chat_args)
    return plan


def _check_data(model_args, ft_args, sft_args, chat_args) -> None:
    """The training data and the chat prompts, read and checked against the model's tokenizer before any stage
    runs: a bad file, row or turn, or conversations without a chat template, is one line now, not after pruning."""
    from .modeling import resolve_model_dir

    model = model_args.model_name_or_path
    tokenizer = _tokenizer(Path(resolve_model_dir(model)))
    check_chat_settings(ft_args, chat_args, tokenizer, model)
    if is_selfgen(ft_args.train_data):
        require(
            ft_args.train_format in ("auto", "prompt-completion"), "train_format: selfgen rows are prompt-completion"
        )
        return
    data = load_rows_source(ft_args.train_data, ft_args.train_split, ft_args.train_format, ft_args.train_max_rows)
    check_chat_template(tokenizer, data, model, sft_args)


def _recipe(
    model_args, method: CompressionMethod, calib_args, margs, eval_args, ft_args, sft_args, distill_args, chat_args
) -> dict[str, Any]:
    """Everything that shapes the run's artifacts (not where they go, nor how the run starts): the calibration and
    the active method's fields only, so a slicing run never depends on a pruning field it does not read; the
    teacher's fields only when there is one, so a plain run's recipe.json stays as it was."""
    recipe = {
        "model": asdict(model_args),
        "calibration": asdict(calib_args),
        method.name: asdict(margs),
        "eval": asdict(eval_args),
        "finetune": {k: v for k, v in asdict(ft_args).items() if k not in NOT_RECIPE},
        "training": _training_settings(sft_args),
        "chat": asdict(chat_args),
    }
    if distill_args.enabled:
        recipe["distillation"] = asdict(distill_args)
    return json.loads(json.dumps(recipe, default=str))


def _changes(saved: dict[str, Any], recipe: dict[str, Any]) -> list[str]:
    """How ``recipe`` differs from a saved run's (:func:`dlp.rundir.recipe_changes`), plus a teacher the saved run
    had and this one has not: its fields are recorded only when there is one, and ``recipe_changes`` compares the keys
    this recipe records."""
    changed = recipe_changes(saved, recipe)
    if "distillation" in saved and "distillation" not in recipe:
        changed.append(f"teacher: {saved['distillation'].get('teacher')!r} → 'none'")
    return changed


def _finished_run(out: Path, recipe: dict[str, Any], overwrite: bool, announce: bool) -> dict[str, Any] | None:
    """The report of a finished run of the same recipe in ``out`` (None: none, or ``overwrite``); a finished run of
    another recipe (its ``recipe.json``) is refused in one line naming the fields that differ."""

    return finished_report(
        out, overwrite, lambda _report: _changes(read_json(out / "recipe.json") or {}, recipe), announce
    )


def _training_settings(sft_args) -> dict[str, Any]:
    """The trainer settings worth recording, as JSON values (enums such as the scheduler type become strings)."""
    return {name: json.loads(json.dumps(getattr(sft_args, name, None), default=str)) for name in TRAINING_FIELDS}


def _check_resumable(out: Path, recipe: dict[str, Any], overwrite: bool) -> bool:
    """Whether ``out`` may be resumed with ``recipe`` (read-only): True if it holds no recipe.json yet, or one of a
    run that finished no stage (replaced); False if it holds this recipe's. A partial run of another recipe is
    refused in one line: resuming it would silently reuse its stale stages."""
    saved = None if overwrite or not out.is_dir() else read_json(out / "recipe.json")
    if saved is None:
        return True
    changed = _changes(saved, recipe)
    if changed and not _has_progress(out):
        return True  # an earlier run that stopped before any stage finished: nothing would be reused
    require(
        not changed,
        f"output_dir {out} holds a run of another recipe ({'; '.join(changed[:3])}); "
        "rerun with --overwrite true or choose another output_dir",
    )
    return False


def _claim_output_dir(out: Path, recipe: dict[str, Any], state) -> None:
    """Record ``recipe`` in the locked ``out`` unless it holds a partial run of the same recipe (checked again under
    the lock: the read-only check before it may have raced with the run it waited for)."""
    if _check_resumable(out, recipe, overwrite=False) and state.is_main_process:
        if (out / "recipe.json").is_file():
            print(f"[dlp] {out / 'recipe.json'} is from a run that finished no stage; replacing it")
        atomic_write_json(out / "recipe.json", recipe)
    state.wait_for_everyone()


def _has_progress(out: Path) -> bool:
    """Whether a run in ``out`` got as far as any artifact a rerun would reuse (a stage's model, scores, masks,
    checkpoints or adapter); a run refused or killed before that left only its recipe."""
    stage_files = ("layer_scores.json", "masks.safetensors", "model")
    staged = any((stage / name).exists() for stage in out.iterdir() if stage.is_dir() for name in stage_files)
    reused = any((out / name).exists() for name in ("adapter", "model"))
    return staged or reused or bool(list((out / "finetune").glob("checkpoint-*")))


def _compress_stage(
    method: CompressionMethod, run, reuse_dir: str | None, seed: int, out: Path, state
) -> tuple[Path, StageReport]:
    """The compression stage (``run(run_args)``, i.e. the method's own script's work) on the main process only;
    the other processes wait, then read its finished report. ``reuse_dir``: a finished run of that script."""
    if reuse_dir:
        stage_dir = Path(reuse_dir)
        report = read_json(stage_dir / "report.json")
        require(
            method.report_type.describes(report) and (stage_dir / "model" / "config.json").is_file(),
            f"{method.reuse_field}: {stage_dir} is not a finished {method.script} run (report.json and model/ "
            "are needed)",
        )
        return stage_dir, method.report_type.from_dict(report)
    stage_dir = out / method.name
    if state.is_main_process:
        with zero3_init_disabled():
            run(RunArguments(output_dir=str(stage_dir), seed=seed, overwrite=False, save_model=True))
    state.wait_for_everyone()  # the others wait for the main process's finished report
    return stage_dir, method.report_type.from_dict(read_json(stage_dir / "report.json"))


def _finetune_stage(
    model_args,
    method: CompressionMethod,
    ft_args,
    sft_args,
    stage_dir: Path,
    masks: MaskSet | None,
    out: Path,
    state,
    data,
    distillation=None,
) -> None:
    quantization = bnb_config(model_args)
    with timed(timings := {}, "load"):
        model, tokenizer = load_model_and_tokenizer(
            str(stage_dir / "model"),
            model_args.dtype or "float32",
            model_args.attn_implementation or "sdpa",
            quantization,
        )
        if quantization is not None:
            model = prepare_4bit_for_training(model, bool(sft_args.activation_checkpointing))
        binding = adapter_binding(model, masks)
        seed_all(sft_args.seed)  # the adapter's initial A: the same whether the stage ran here, was reused or resumed
        peft_model = masked_lora_model(model, masks, model_args, method.lora_targets(model))
    if state.is_main_process:
        peft_model.print_trainable_parameters()
    describe_zero3_shards(model, state)
    run_dir = sft_args.output_dir
    sft_args.output_dir = str(out / "finetune")
    if state.is_main_process:
        claim_dir(out / "finetune")  # marked as dlp's, so --overwrite may remove the trainer's checkpoints
    state.wait_for_everyone()
    try:
        trainer, result = train(peft_model, tokenizer, ft_args, sft_args, data, distillation)
    finally:
        sft_args.output_dir = run_dir
    staging = out / f"{TEMP_PREFIX}adapter"
    with timed(timings, "save_adapter"):
        trainer.save_model(str(staging))  # every process takes part (sharded engines gather); the main one writes
    if state.is_main_process:
        log = {**asdict(result), "load_seconds": timings["load_s"], "save_seconds": timings["save_adapter_s"]}
        atomic_write_json(staging / "training_log.json", log)
        atomic_write_json(staging / BINDING_FILE, binding)
        if quantization is not None:  # what merge_base dequantized rebuilds the trained-on base from
            atomic_write_json(staging / QUANTIZATION_FILE, quantization.to_dict())
        mark_dir(staging)  # the adapter is dlp's to replace
        if (out / "adapter").exists():
            shutil.rmtree(out / "adapter")  # an earlier, unfinished copy in this (dlp's) run directory
        os.replace(staging, out / "adapter")
    state.wait_for_everyone()


def _merge_export_evaluate(
    model_args,
    method: CompressionMethod,
    calib_args,
    eval_args,
    ft_args,
    sft_args,
    stage_dir: Path,
    stage_report: StageReport,
    masks: MaskSet | None,
    out: Path,
    distillation: dict[str, Any] | None = None,
    chat_args=None,
) -> None:
    dtype = model_args.dtype or "float32"
    merge_info = read_json(out / "merge.json")
    if merge_info is None or not (out / "model" / "config.json").is_file():
        parts: dict[str, float] = {}
        with timed(parts, "merge"):
            peft_model, tokenizer = load_adapter_model(
                stage_dir / "model", out / "adapter", masks, dtype, ft_args.merge_base
            )
            probe = None
            if ft_args.check_merge:  # a logits comparison only: any real text will do, and the calibration text is text
                probe = load_training_windows(
                    tokenizer, calib_args.calibration_data, min(128, sft_args.max_length), "train", max_windows=2
                )
            merged, check = merge_masked(peft_model, masks, probe, method.merge_tolerance)
        with timed(parts, "export"):
            export_formats(merged, tokenizer, masks, out / "model", ft_args)
        merge_info = {**check.to_dict(), "merge_base": ft_args.merge_base, "seconds": parts["merge_s"]}
        merge_info["export_seconds"] = parts["export_s"]
        atomic_write_json(out / "merge.json", merge_info)  # after the export: both are done once it exists
        print(f"[dlp] merged model exported to {out / 'model'} (max |Δlogit| {check.max_logit_diff})")
    if ft_args.export_4bit and not (out / "model-4bit" / "config.json").is_file():
        export_quantized(out / "model", out / "model-4bit", masks, bnb_config(model_args, always=True))
        print(f"[dlp] 4-bit copy of the merged model exported to {out / 'model-4bit'}")
    evaluation = read_json(out / "eval.json") or _evaluate_export(
        out, method, stage_dir, masks, model_args, calib_args, eval_args, ft_args, chat_args
    )
    report = _final_report(
        model_args,
        method,
        eval_args,
        ft_args,
        sft_args,
        stage_report,
        merge_info,
        evaluation,
        read_json(out / "adapter" / "training_log.json"),
    )
    report.distillation = distillation
    report.chat = evaluation.get("chat")
    report.timings.update(generation_seconds(out))  # the dense model's answers: self-generated data, references
    report.peak_memory = peak_memory(resolve_device(calib_args.device))
    write_finetune_report(out, out / "model", report, method.card_view)


def _evaluate_export(
    out: Path,
    method: CompressionMethod,
    stage_dir: Path,
    masks: MaskSet | None,
    model_args,
    calib_args,
    eval_args: EvalArguments,
    ft_args: FinetuneArguments,
    chat_args=None,
) -> dict:
    """Reload the export with plain transformers (no dlp code involved) and measure it; in 4-bit runs also the
    quantized compressed base (what training started from) and the 4-bit export. A method whose export ships its
    own modeling file loads through it (``trust_remote_code=True``), as a user's would."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def measure(model_dir: Path, quantization=None):
        extra = {"quantization_config": quantization} if quantization is not None else {}  # None would undo a
        if is_compressed_checkpoint(model_dir):  # saved 4-bit config
            extra["compressed_mode"] = "dense"  # its remote code decompresses it into the architecture's model
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype="float32",
            trust_remote_code=method.trust_remote_code or "compressed_mode" in extra,
            **extra,
        ).eval()
        keep_canonical_4bit_layout(model)  # a 4-bit export would otherwise be repacked on AVX512-BF16 CPUs
        return model, perplexity(
            model,
            tokenizer,
            eval_args.eval_data,
            seqlen=eval_args.eval_seqlen,
            max_windows=eval_args.max_windows,
            batch_size=eval_args.eval_batch_size,
            device=resolve_device(calib_args.device),
        )

    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    model, ppl = measure(out / "model")
    finetuned = model
    print(f"[dlp] fine-tuned perplexity {ppl}")
    evaluation = {"perplexity": {}}
    if masks is not None:
        evaluation.update(reloaded_violations=masks.violations(model), masks_digest=masks.digest())
    if model_args.load_in_4bit:
        evaluation["perplexity"]["pruned_4bit"] = measure(stage_dir / "model", bnb_config(model_args))[1].to_dict()
    evaluation["perplexity"]["finetuned"] = ppl.to_dict()
    if ft_args.export_dense and ft_args.export_sparse and ft_args.export_values != "model" and masks is not None:
        model, ppl = measure(compressed_dir(out / "model"))  # quantized values: its own perplexity
        evaluation["perplexity"][f"finetuned_{ft_args.export_values}"] = ppl.to_dict()
    if chat_args is not None:
        evaluation["chat"] = _chat_evaluation(out, stage_dir, method, finetuned, tokenizer, chat_args, calib_args)
    if ft_args.export_4bit:
        model, ppl = measure(out / "model-4bit")
        evaluation["perplexity"]["finetuned_4bit"] = ppl.to_dict()
        evaluation["reloaded_violations_4bit"] = masks.violations(model)
    atomic_write_json(out / "eval.json", evaluation)
    return evaluation


def _chat_evaluation(out: Path, stage_dir: Path, method, finetuned, tokenizer, chat_args, calib_args) -> dict:
    """The chat evaluation of the compressed model (the stage's, before fine-tuning) and of the fine-tuned export."""
    from transformers import AutoModelForCausalLM

    compressed = AutoModelForCausalLM.from_pretrained(
        stage_dir / "model", dtype="float32", trust_remote_code=method.trust_remote_code
    ).eval()
    models = {method.compressed_name: compressed, "finetuned": finetuned}
    device = resolve_device(calib_args.device)
    return chat_evaluation({name: m.to(device) for name, m in models.items()}, tokenizer, chat_args, out, device)


def _final_report(
    model_args,
    method: CompressionMethod,
    eval_args,
    ft_args,
    sft_args,
    stage_report: StageReport,
    merge_info: dict,
    evaluation: dict,
    training_log: dict,
) -> FinetuneReport:
    lora = {
        name: getattr(model_args, name)
        for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_rslora")
    }
    return FinetuneReport(
        model=stage_report.model,
        method=method.name,
        config={
            **stage_report.config,
            **asdict(eval_args),
            **asdict(ft_args),
            "lora": lora,
            "training": _training_settings(sft_args),
        },
        perplexity={**stage_report.perplexity, **evaluation["perplexity"]},
        compression=method.compression_section(stage_report, evaluation),
        calibration_sha256=stage_report.calibration_sha256,
        merge=merge_info,
        export={key: value for key, value in evaluation.items() if key.startswith("reloaded_violations")},
        quantization=bnb_config(model_args).to_dict() if model_args.load_in_4bit else None,
        training={key: training_log.get(key) for key in TRAINING_LOG_KEYS if key in training_log},
        log_history=training_log["log_history"],
        timings=_pipeline_timings(stage_report, training_log, merge_info, evaluation),
    )


TRAINING_LOG_KEYS = (
    "global_steps",
    "tokens_seen",
    "train_seconds",
    "resumed_from",
    "data_format",
    "train_rows",
    "train_examples",
)


def _pipeline_timings(stage_report: StageReport, training_log: dict, merge_info: dict, evaluation: dict) -> dict:
    """The compression stage's parts, then the pipeline's: loading the base for training, training, saving the
    adapter, merging, exporting and evaluating the export (parts an older run's artifacts did not time are left out)."""
    parts = {
        "train_load_s": training_log.get("load_seconds"),
        "train_s": training_log["train_seconds"],
        "save_adapter_s": training_log.get("save_seconds"),
        "merge_s": merge_info["seconds"],
        "export_s": merge_info.get("export_seconds"),
        "eval_finetuned_s": evaluation["perplexity"]["finetuned"]["seconds"],
    }
    return {**stage_report.timings, **{name: value for name, value in parts.items() if value is not None}}
