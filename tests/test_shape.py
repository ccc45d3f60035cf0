"""The extension points: registries of criteria, allocators and compression methods; shared calibration settings;
typed reports; renamed recipes. Each test shows that the rest of dlp looks an entry up instead of naming it."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, tiny_model
from dlp.allocate import Allocator, LayerScores
from dlp.allocators import ALLOCATORS, compute_sparsities
from dlp.config import CalibrationArguments, EvalArguments, PruneArguments, RunArguments, SliceArguments, parse_config
from dlp.criteria import CRITERIA, Criterion, PruneSpec, keep_mask
from dlp.errors import DlpError
from dlp.pipeline import recipe_changes
from dlp.pruner import check_prune_mode, prune_model
from dlp.report_schema import FinetuneReport, PruneReport, SliceReport
from dlp.stages import METHODS, get_method


def test_criteria_registry_says_what_each_criterion_needs():
    assert list(CRITERIA) == ["magnitude", "wanda", "sparsegpt"]
    assert not CRITERIA["magnitude"].needs_data and CRITERIA["wanda"].needs_data
    assert CRITERIA["sparsegpt"].needs_hessian and not CRITERIA["sparsegpt"].supports_fast
    assert PruneSpec("sparsegpt").needs_xtx and not PruneSpec("wanda").needs_xtx
    check_prune_mode("wanda", "fast")
    with pytest.raises(DlpError, match="prune_mode fast supports criterion magnitude, wanda"):
        check_prune_mode("sparsegpt", "fast")
    with pytest.raises(DlpError, match="prune_mode fast supports criterion"):  # the config asks the same rule
        PruneArguments(criterion="sparsegpt", prune_mode="fast")


def test_a_registered_criterion_is_a_recipe_choice_and_prunes(monkeypatch, calib_ids):
    """One registry entry is all a criterion needs: the config accepts it and the pruner runs it."""

    def prune_largest(weight, stats, sparsity, spec):  # a deliberately odd rule: drop the largest magnitudes
        keep = keep_mask(-weight.abs().float(), sparsity, spec.pattern)
        weight.mul_(keep.to(weight.dtype))
        return keep

    monkeypatch.setitem(CRITERIA, "largest", Criterion("largest", prune_largest, needs_data=False))
    PruneArguments(criterion="largest", prune_mode="fast")  # needs no data, needs no Hessian: fast is fine
    model = tiny_model("llama")
    weight = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    masks = prune_model(model, None, [0.5] * 3, PruneSpec("largest"))
    kept = masks.masks["model.layers.0.mlp.down_proj"]
    assert masks.violations(model) == 0 and abs(kept.float().mean() - 0.5) < 1e-6
    for row, keep in zip(weight.abs(), kept):  # every row kept its smallest half
        assert row[keep].max() <= row[~keep].min()


def test_a_registered_allocator_is_a_recipe_choice(monkeypatch):
    """An allocator is one entry: name, whether it needs the scoring sweep, the function; balance does the rest."""
    ramp = Allocator(
        "ramp",
        lambda r: [r.settings.sparsity - 0.1 + 0.2 * i / (r.num_layers - 1) for i in range(r.num_layers)],
        needs_scores=False,
    )
    monkeypatch.setitem(ALLOCATORS, "ramp", ramp)
    settings = PruneArguments(allocation="ramp", sparsity=0.5)
    assert compute_sparsities(settings, None, [10, 10, 10]) == pytest.approx([0.4, 0.5, 0.6])
    assert compute_sparsities(settings, None, [10, 10, 20])[0] == pytest.approx(0.375)  # rebalanced by weight
    scores = [LayerScores(1.0, 1.0, 0.1, 0.9, 10)] * 3
    with pytest.raises(DlpError, match="allocation dlp needs the layer scores"):
        compute_sparsities(PruneArguments(allocation="dlp"), None, [10] * 3)
    assert compute_sparsities(PruneArguments(allocation="dlp", sparsity=0.5), scores, [10] * 3) == [0.5] * 3


def test_each_method_object_owns_its_decisions():
    prune, slice_ = get_method("prune"), get_method("slice")
    assert set(METHODS) == {"prune", "slice"} and prune.supports_4bit and not slice_.supports_4bit
    assert slice_.trust_remote_code and not prune.trust_remote_code
    assert (prune.arguments, slice_.arguments) == (PruneArguments, SliceArguments)
    assert prune.merge_tolerance(torch.full((2,), 1000.0)) == 1e-4  # mask-exact: absolute, whatever the logits
    assert slice_.merge_tolerance(torch.full((2,), 1000.0)) == pytest.approx(1.0)  # plain LoRA: relative
    with pytest.raises(DlpError, match="method must be one of prune, slice"):
        get_method("quantize")


def test_sliced_models_get_no_adapters_on_their_basis_changes():
    from dlp.slicing import slice_model

    model = tiny_model("llama")
    sliced = slice_model(model, torch.randint(0, 128, (2, 16)), [24, 24, 24])
    targets = get_method("slice").lora_targets(sliced)
    assert "q_proj" in targets and not {"input_proj", "attn_shortcut", "mlp_shortcut"} & set(targets)
    assert get_method("prune").lora_targets(model) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]


def test_calibration_settings_are_their_own_group_seeded_by_the_recipe_seed():
    calib, prune = parse_config(
        [CalibrationArguments, PruneArguments],
        ["--nsamples", "4", "--seqlen", "64", "--device", "cpu", "--sparsity", "0.5"],
    )
    assert (calib.nsamples, calib.seqlen, calib.device) == (4, 64, "cpu")
    assert not hasattr(prune, "nsamples") and prune.sparsity == 0.5
    assert CalibrationArguments().seeded(7).seed == 7
    with pytest.raises(DlpError, match="nsamples must be >= 1"):
        CalibrationArguments(nsamples=0)


def test_a_slicing_run_resumes_whatever_pruning_fields_say():
    """recipe.json records the active method's fields only; comparison is by flat key over what this run records,
    so a recipe.json of the older layout (calibration fields inside the prune group) still matches."""
    new = {"calibration": {"nsamples": 4, "seqlen": 64}, "slice": {"slicing": 0.25}, "finetune": {"method": "slice"}}
    assert recipe_changes(new, new) == []
    older_layout = {
        "prune": {"nsamples": 4, "seqlen": 64, "sparsity": 0.7},
        "slice": {"slicing": 0.25},
        "finetune": {"method": "slice"},
    }
    assert recipe_changes(older_layout, new) == []  # a pruning field it never reads is not compared
    changed = {**new, "calibration": {"nsamples": 8, "seqlen": 64}}
    assert recipe_changes(new, changed) == ["nsamples: 4 → 8"]


def test_typed_reports_round_trip_and_recognise_their_kind():
    prune = PruneReport(
        model="m",
        config={"sparsity": 0.5},
        perplexity={"dense": None, "pruned": {"value": 3.0}},
        timings={"prune_s": 1.0},
        calibration_sha256="c",
        target_sparsity=0.5,
        sparsity={"overall": 0.5, "weights": 8, "modules": {}},
        layer_sparsity={"allocated": [0.5], "measured": [0.5]},
        layer_scores=None,
        masks_digest="d",
    )
    data = json.loads(json.dumps(prune.to_dict()))
    assert PruneReport.from_dict(data) == prune
    assert PruneReport.describes(data) and not SliceReport.describes(data) and not PruneReport.describes(None)
    final = FinetuneReport(
        model="m",
        method="prune",
        config={},
        perplexity={},
        calibration_sha256="c",
        merge={},
        export={},
        quantization=None,
        training={},
        log_history=[],
        timings={},
        compression={"masks_digest": "d", "sparsity": {"overall": 0.5}},
    )
    flat = final.to_dict()
    assert flat["masks_digest"] == "d" and "compression" not in flat  # report.json keeps its top-level keys
    assert FinetuneReport.from_dict(flat) == final


def test_renamed_recipes_load_under_their_old_path_with_a_deprecation_line(capsys):
    from trl import ModelConfig

    old = REPO / "recipes" / "smollm2-135m" / "sparsegpt_dlp_70.yaml"
    assert not old.exists()
    types = [ModelConfig, CalibrationArguments, PruneArguments, EvalArguments, RunArguments]
    prune = parse_config(types, ["--config", str(old)])[2]
    assert prune.criterion == "sparsegpt" and prune.allocation == "dlp"
    assert "deprecated: recipe" in capsys.readouterr().out
    with pytest.raises(DlpError, match="config: cannot read"):
        parse_config(types, ["--config", str(old.with_name("never_existed.yaml"))])


def test_the_pruner_old_import_path_still_works_with_a_deprecation_warning():
    import importlib
    import sys

    import dlp.pruner

    sys.modules.pop("dlp.layerwise", None)
    with pytest.warns(DeprecationWarning, match="dlp.layerwise is deprecated: import from dlp.pruner"):
        layerwise = importlib.import_module("dlp.layerwise")
    assert layerwise.prune_model is dlp.pruner.prune_model and layerwise.PruneSpec is PruneSpec
    import dlp.scoring

    assert layerwise.score_layers is dlp.scoring.score_layers


def test_scoring_names_still_import_from_the_pruner_with_a_deprecation_warning():
    """score_layers, Scoring and token_cosines moved to dlp.scoring (the README's Python API imported them from
    dlp.pruner until 2026-12)."""
    import dlp.pruner
    import dlp.scoring

    for name in ("score_layers", "Scoring", "token_cosines"):
        with pytest.warns(DeprecationWarning, match=f"dlp.pruner.{name} moved to dlp.scoring"):
            assert getattr(dlp.pruner, name) is getattr(dlp.scoring, name)
    with pytest.raises(AttributeError):
        dlp.pruner.no_such_name  # noqa: B018
