"""Prune-then-finetune: prune → finetune → merge → export → evaluate, one recipe, every stage resumable.

Layout of ``output_dir`` (each artifact is written atomically; its presence marks its stage finished):

* ``prune/``: a ``train/prune.py`` run (masks, pruned model, dense/pruned perplexity), or ``prune_dir`` reused;
  with ``method: slice``, ``slice/`` instead: a ``train/slice.py`` run (the sliced model), or ``slice_dir``;
* ``finetune/checkpoint-N``: trainer checkpoints, resumed from after an interruption;
* ``adapter/``: the trained mask-exact LoRA adapter and its training log;
* ``merge.json`` then ``model/``: the merged sparse model (loads with plain transformers) and its masks;
* ``eval.json``: perplexity of the exported model, reloaded without dlp;
* ``report.json``, ``summary.md``, ``sparsity.png``, ``loss.png`` and the model card ``model/README.md``;
  ``report.json`` comes last and marks the whole run finished.

Under ``accelerate launch`` with several processes, pruning, merging and evaluation run on the main process
(the others wait at a barrier and then load its results); training runs on every process (DDP, or DeepSpeed
ZeRO-2/3, whose partitioned loading keeps a large base from ever being whole on one rank), and every rank checks
that it holds the same masks before it trains.

A sliced model has no masks: its weights are dense, only smaller, so its LoRA is peft's own, and the export
ships the sliced architecture's modeling file (it reloads with ``trust_remote_code=True``).

A ``load_in_4bit`` recipe trains the adapter on the pruned base quantized to 4-bit (QLoRA); ``merge_base`` picks
what it is merged into, and ``export_4bit`` adds ``model-4bit/``, the merged model re-quantized.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import EvalArguments, FinetuneArguments, PruneArguments, RunArguments, SliceArguments
from .data import check_source, load_training_windows
from .distributed import check_same_masks, zero3_enabled, zero3_init_disabled
from .errors import DlpError, require
from .evaluate import perplexity
from .finetune import check_lora_args, masked_lora_model, train
from .io import TEMP_PREFIX, atomic_write_json, claim_dir, mark_dir, read_json, start_output_dir
from .masks import MaskSet
from .merge import QUANTIZATION_FILE, export_model, export_quantized, load_adapter_model, merge_masked
from .modeling import load_model_and_tokenizer
from .quantize import bnb_config, check_quantization_args, keep_canonical_4bit_layout
from .report import write_finetune_report
from .preflight import check_masks_fit
from .run_prune import check_prune_settings, finished_report, run_prune
from .run_slice import check_slice_settings, run_slice
from .runtime import resolve_device

TRAINING_FIELDS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs", "max_steps",
                   "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "weight_decay",
                   "activation_checkpointing", "bf16", "seed")


def run_prune_lora(model_args, prune_args: PruneArguments, eval_args: EvalArguments, ft_args: FinetuneArguments,
                   sft_args, slice_args: SliceArguments | None = None) -> dict[str, Any]:
    """Run (or resume) the whole pipeline into ``sft_args.output_dir``; return the final report."""
    from accelerate import PartialState

    state = PartialState()  # already set up by the training arguments (see runtime.use_cpu_without_accelerator)
    out = Path(sft_args.output_dir)
    require(ft_args.train_data != eval_args.eval_data, "train_data must not be the evaluation text (eval_data)")
    require(sft_args.max_length is not None and sft_args.max_length >= 2, "max_length must be >= 2 (tokens per training window)")
    check_lora_args(model_args)
    check_quantization_args(model_args)
    require(ft_args.merge_base == "full" or model_args.load_in_4bit,
            "merge_base dequantized needs load_in_4bit: true (a full-precision base has nothing to dequantize)")
    require(not (model_args.load_in_4bit and zero3_enabled()), "load_in_4bit is not supported under ZeRO-3 here; "
            "train QLoRA with accelerate_configs/ddp.yaml or deepspeed_zero2.yaml")
    require(ft_args.method == "prune" or not model_args.load_in_4bit,
            "load_in_4bit is supported with method prune only (got method slice)")
    slice_args = slice_args or SliceArguments()
    finished = finished_report(out, ft_args.overwrite, announce=state.is_main_process)
    if finished is not None:
        return finished
    _check_pipeline_settings(model_args, prune_args, slice_args, eval_args, ft_args, sft_args)
    if state.is_main_process:
        start_output_dir(out, ft_args.overwrite)
    state.wait_for_everyone()
    _claim_output_dir(out, _recipe(model_args, prune_args, eval_args, ft_args, sft_args, slice_args), state)

    if ft_args.method == "slice":
        prune_dir, prune_report = _compress_stage("slice", ft_args.slice_dir, lambda run_args: run_slice(
            model_args, prune_args, slice_args, eval_args, run_args), sft_args.seed, out, state)
        masks = None
    else:
        prune_dir, prune_report = _compress_stage("prune", ft_args.prune_dir, lambda run_args: run_prune(
            model_args, prune_args, eval_args, run_args), sft_args.seed, out, state)
        masks = MaskSet.load(prune_dir / "masks.safetensors")
        check_same_masks(masks.digest(), state)
    if not (out / "adapter" / "adapter_config.json").is_file():
        _finetune_stage(model_args, ft_args, sft_args, prune_dir, masks, out, state)
    if state.is_main_process:
        with zero3_init_disabled():
            _merge_export_evaluate(model_args, prune_args, eval_args, ft_args, sft_args, prune_dir, prune_report,
                                   masks, out)
    state.wait_for_everyone()
    return read_json(out / "report.json")


def _check_pipeline_settings(model_args, prune_args, slice_args, eval_args, ft_args, sft_args) -> None:
    """Every check that needs the model's config but not its weights, before any stage runs (see preflight.py)."""
    if ft_args.method == "slice":
        check_slice_settings(model_args, prune_args, eval_args, max_length=sft_args.max_length)
    else:
        plan = check_prune_settings(model_args, prune_args, eval_args, max_length=sft_args.max_length)
        if ft_args.prune_dir:
            reused = Path(ft_args.prune_dir) / "masks.safetensors"
            require(reused.is_file(), f"prune_dir: {ft_args.prune_dir} holds no masks.safetensors "
                                      "(a finished train/prune.py run is needed)")
            masks = MaskSet.load(reused)
            check_masks_fit(plan, masks.metadata, {n: tuple(m.shape) for n, m in masks.masks.items()}, "prune_dir")
    check_source(ft_args.train_data, "train_data")


def _recipe(model_args, prune_args, eval_args, ft_args, sft_args, slice_args) -> dict[str, Any]:
    """Everything that shapes the run's artifacts (not where they go, nor whether to start over)."""
    recipe = {"model": asdict(model_args), "prune": asdict(prune_args), "eval": asdict(eval_args),
              **({"slice": asdict(slice_args)} if ft_args.method == "slice" else {}),
              "finetune": {k: v for k, v in asdict(ft_args).items() if k != "overwrite"},
              "training": _training_settings(sft_args)}
    return json.loads(json.dumps(recipe, default=str))


def _training_settings(sft_args) -> dict[str, Any]:
    """The trainer settings worth recording, as JSON values (enums such as the scheduler type become strings)."""
    return {name: json.loads(json.dumps(getattr(sft_args, name, None), default=str)) for name in TRAINING_FIELDS}


def _claim_output_dir(out: Path, recipe: dict[str, Any], state) -> None:
    """Resuming is only safe with the same recipe: a changed one would silently reuse stale stages."""
    saved = read_json(out / "recipe.json")
    if saved is not None and saved != recipe and not _has_progress(out):
        saved = None  # an earlier run that stopped before any stage finished: nothing of it would be reused
        if state.is_main_process:
            print(f"[dlp] {out / 'recipe.json'} is from a run that finished no stage; replacing it")
    if saved is not None and saved != recipe:
        changed = [f"{key}: {saved[group].get(key)!r} → {value!r}" for group, fields in recipe.items()
                   for key, value in fields.items() if saved.get(group, {}).get(key) != value]
        raise DlpError(f"output_dir {out} holds a run of another recipe ({'; '.join(changed[:3])}); "
                       "rerun with --overwrite true or choose another output_dir")
    if saved is None and state.is_main_process:
        atomic_write_json(out / "recipe.json", recipe)
    state.wait_for_everyone()


def _has_progress(out: Path) -> bool:
    """Whether a run in ``out`` got as far as any artifact a rerun would reuse (a stage's model, scores,
    checkpoints or adapter); a run refused or killed before that left only its recipe."""
    reusable = ("prune/layer_scores.json", "prune/masks.safetensors", "slice/layer_scores.json", "slice/model",
                "adapter", "model")
    return any((out / name).exists() for name in reusable) or bool(list((out / "finetune").glob("checkpoint-*")))


def _compress_stage(method: str, reuse_dir: str | None, run, seed: int, out: Path, state) -> tuple[Path, dict]:
    """Prune or slice (``run(run_args)``, i.e. train/prune.py's or train/slice.py's work) on the main process only;
    the other processes wait, then read its finished report. ``reuse_dir``: a finished run of that script."""
    if reuse_dir:
        base_dir = Path(reuse_dir)
        report = read_json(base_dir / "report.json")
        require(report is not None and ("slicing" in report) == (method == "slice")
                and (base_dir / "model" / "config.json").is_file(),
                f"{method}_dir: {base_dir} is not a finished train/{method}.py run (report.json and model/ are needed)")
        return base_dir, report
    base_dir = out / method
    if state.is_main_process:
        with zero3_init_disabled():
            run(RunArguments(output_dir=str(base_dir), seed=seed, overwrite=False, save_model=True))
    state.wait_for_everyone()  # the others wait for the main process's finished report
    return base_dir, read_json(base_dir / "report.json")


def _finetune_stage(model_args, ft_args, sft_args, prune_dir: Path, masks: MaskSet | None, out: Path, state) -> None:
    quantization = bnb_config(model_args)
    model, tokenizer = load_model_and_tokenizer(str(prune_dir / "model"), model_args.dtype or "float32",
                                                model_args.attn_implementation or "sdpa", quantization)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(sft_args.activation_checkpointing))
    peft_model = masked_lora_model(model, masks, model_args)
    if state.is_main_process:
        peft_model.print_trainable_parameters()
    if zero3_enabled():
        shards = [p for p in model.parameters() if hasattr(p, "ds_numel")]
        held, total = sum(p.ds_tensor.numel() for p in shards), sum(p.ds_numel for p in shards)
        print(f"[dlp] ZeRO-3: rank {state.process_index} holds {held:,} of {total:,} base weights "
              f"({100 * held / max(total, 1):.0f}%)")
    run_dir = sft_args.output_dir
    sft_args.output_dir = str(out / "finetune")
    if state.is_main_process:
        claim_dir(out / "finetune")  # marked as dlp's, so --overwrite may remove the trainer's checkpoints
    state.wait_for_everyone()
    try:
        trainer, result = train(peft_model, tokenizer, ft_args, sft_args)
    finally:
        sft_args.output_dir = run_dir
    staging = out / f"{TEMP_PREFIX}adapter"
    trainer.save_model(str(staging))  # every process takes part (sharded engines gather); the main one writes
    if state.is_main_process:
        atomic_write_json(staging / "training_log.json", asdict(result))
        if quantization is not None:  # what merge_base dequantized rebuilds the trained-on base from
            atomic_write_json(staging / QUANTIZATION_FILE, quantization.to_dict())
        mark_dir(staging)  # the adapter is dlp's to replace
        if (out / "adapter").exists():
            shutil.rmtree(out / "adapter")  # an earlier, unfinished copy in this (dlp's) run directory
        os.replace(staging, out / "adapter")
    state.wait_for_everyone()


def _merge_export_evaluate(model_args, prune_args, eval_args, ft_args, sft_args, prune_dir: Path, prune_report: dict,
                           masks: MaskSet | None, out: Path) -> dict:
    dtype = model_args.dtype or "float32"
    merge_info = read_json(out / "merge.json")
    if merge_info is None or not (out / "model" / "config.json").is_file():
        start = time.perf_counter()
        peft_model, tokenizer = load_adapter_model(prune_dir / "model", out / "adapter", masks, dtype,
                                                   ft_args.merge_base)
        probe = None
        if ft_args.check_merge:
            probe = load_training_windows(tokenizer, ft_args.train_data, min(128, sft_args.max_length),
                                          ft_args.train_split, max_windows=2)
        merged, check = merge_masked(peft_model, masks, probe)
        merge_info = {**check.to_dict(), "merge_base": ft_args.merge_base, "seconds": time.perf_counter() - start}
        atomic_write_json(out / "merge.json", merge_info)
        export_model(merged, tokenizer, masks, out / "model")
        print(f"[dlp] merged model exported to {out / 'model'} (max |Δlogit| {check.max_logit_diff})")
    if ft_args.export_4bit and not (out / "model-4bit" / "config.json").is_file():
        export_quantized(out / "model", out / "model-4bit", masks, bnb_config(model_args, always=True))
        print(f"[dlp] 4-bit copy of the merged model exported to {out / 'model-4bit'}")
    evaluation = read_json(out / "eval.json") or _evaluate_export(out, prune_dir, masks, model_args, eval_args,
                                                                  prune_args, ft_args)
    report = _final_report(model_args, prune_args, eval_args, ft_args, sft_args, prune_report, merge_info,
                           evaluation, read_json(out / "adapter" / "training_log.json"))
    write_finetune_report(out, out / "model", report)
    return report


def _evaluate_export(out: Path, prune_dir: Path, masks: MaskSet | None, model_args, eval_args: EvalArguments,
                     prune_args: PruneArguments, ft_args: FinetuneArguments) -> dict:
    """Reload the export with plain transformers (no dlp code involved) and measure it; in 4-bit runs also the
    quantized pruned base (what training started from) and the 4-bit export. A sliced export loads through its
    own shipped modeling file (``trust_remote_code=True``), as a user's would."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def measure(model_dir: Path, quantization=None):
        extra = {"quantization_config": quantization} if quantization is not None else {}  # None would undo a
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32", trust_remote_code=ft_args.method == "slice",
                                                     **extra).eval()  # saved 4-bit config
        keep_canonical_4bit_layout(model)  # a 4-bit export would otherwise be repacked on AVX512-BF16 CPUs
        return model, perplexity(model, tokenizer, eval_args.eval_data, seqlen=eval_args.eval_seqlen,
                                 max_windows=eval_args.max_windows, batch_size=eval_args.eval_batch_size,
                                 device=resolve_device(prune_args.device))

    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    model, ppl = measure(out / "model")
    print(f"[dlp] fine-tuned perplexity {ppl}")
    evaluation = {"perplexity": {}}
    if masks is not None:
        evaluation.update(reloaded_violations=masks.violations(model), masks_digest=masks.digest())
    if model_args.load_in_4bit:
        evaluation["perplexity"]["pruned_4bit"] = measure(prune_dir / "model", bnb_config(model_args))[1].to_dict()
    evaluation["perplexity"]["finetuned"] = ppl.to_dict()
    if ft_args.export_4bit:
        model, ppl = measure(out / "model-4bit")
        evaluation["perplexity"]["finetuned_4bit"] = ppl.to_dict()
        evaluation["reloaded_violations_4bit"] = masks.violations(model)
    atomic_write_json(out / "eval.json", evaluation)
    return evaluation


def _final_report(model_args, prune_args, eval_args, ft_args, sft_args, prune_report: dict, merge_info: dict,
                  evaluation: dict, training_log: dict) -> dict[str, Any]:
    lora = {name: getattr(model_args, name) for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                                                          "use_rslora")}
    if ft_args.method == "slice":
        compression = {"slicing": prune_report["slicing"]}
    else:
        compression = {key: prune_report[key] for key in ("sparsity", "layer_sparsity")}
        compression["masks_digest"] = evaluation["masks_digest"]
    return {
        "model": prune_report["model"],
        "method": ft_args.method,
        "config": {**prune_report["config"], **asdict(eval_args), **asdict(ft_args), "lora": lora,
                   "training": _training_settings(sft_args)},
        "perplexity": {**prune_report["perplexity"], **evaluation["perplexity"]},
        **compression,
        "calibration_sha256": prune_report["calibration_sha256"],
        "merge": merge_info,
        "export": {key: value for key, value in evaluation.items() if key.startswith("reloaded_violations")},
        "quantization": bnb_config(model_args).to_dict() if model_args.load_in_4bit else None,
        "training": {key: training_log[key] for key in ("global_steps", "tokens_seen", "train_seconds", "resumed_from")},
        "log_history": training_log["log_history"],
        "timings": {**prune_report["timings"], "train_s": training_log["train_seconds"],
                    "merge_s": merge_info["seconds"], "eval_finetuned_s": evaluation["perplexity"]["finetuned"]["seconds"]},
    }
