"""A few checks on the real SmolLM2-135M (small budgets: about a minute in all on 2 CPU cores)."""

from __future__ import annotations

import pytest
import torch

from conftest import SHARED_DATA, requires_demo_model
from dlp.data import load_calibration
from dlp.evaluate import perplexity
from dlp.layerwise import PruneSpec, layer_param_counts, prune_model, score_layers
from dlp.masks import MaskSet
from dlp.modeling import DEMO_MODEL, load_model_and_tokenizer
from dlp.run_prune import compute_sparsities
from dlp.config import PruneArguments

pytestmark = [pytest.mark.real_model, requires_demo_model]

CALIB = str(SHARED_DATA / "wiki.valid.tokens") if SHARED_DATA.is_dir() else "builtin:wikitext2-valid"
TEST = str(SHARED_DATA / "wiki.test.raw") if SHARED_DATA.is_dir() else "builtin:wikitext2-test"


@pytest.fixture(scope="module")
def smollm2():
    torch.set_flush_denormal(True)
    return load_model_and_tokenizer(DEMO_MODEL)


def test_dense_perplexity_matches_the_known_value(smollm2):
    model, tokenizer = smollm2
    ppl = perplexity(model, tokenizer, TEST, seqlen=512, max_windows=6)
    assert ppl.windows == 6 and ppl.tokens == 6 * 511
    assert 15.0 < ppl.value < 40.0, ppl  # 29.1 over the first 64 windows


def test_dlp_wanda_70_on_smollm2(smollm2, tmp_path):
    model, tokenizer = smollm2
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        calib = load_calibration(tokenizer, CALIB, nsamples=4, seqlen=256, seed=0)
        stats = {}
        scores = score_layers(model, calib.input_ids, keep_stats=stats)
        sparsities = compute_sparsities(PruneArguments(), scores, layer_param_counts(model))
        assert sparsities[0] < 0.7 < sparsities[-1]  # SmolLM2: DLP prunes the last layers most
        masks = prune_model(model, calib.input_ids, sparsities, PruneSpec("wanda"), mode="fast", stats=stats)
        assert abs(masks.sparsity_report()["overall"] - 0.7) < 0.001  # within 0.1 point of the target
        assert MaskSet.load(masks.save(tmp_path / "m.safetensors")).digest() == masks.digest()
        assert masks.violations(model) == 0
        ppl = perplexity(model, tokenizer, TEST, seqlen=512, max_windows=4).value
        assert 40.0 < ppl < 5000.0, ppl
    finally:
        model.load_state_dict(dense)
