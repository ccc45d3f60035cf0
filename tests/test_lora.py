"""Mask-exact LoRA: hand-computed forward, exact merge, masked gradients, and the failure it prevents."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_model
from dlp.errors import DlpError
from dlp.lora import MaskedLoraMixin, attach_masks, lora_layers, masked_lora_layers
from dlp.masks import MaskSet
from dlp.merge import MERGE_TOLERANCE, merge_masked
from dlp.modeling import prunable_linears


def random_masks(model: nn.Module, keep: float = 0.3, seed: int = 0) -> MaskSet:
    g = torch.Generator().manual_seed(seed)
    return MaskSet({n: torch.rand(lin.weight.shape, generator=g) < keep for n, lin in prunable_linears(model).items()})


def pruned_lora_model(masks_seed: int = 0, r: int = 4, dropout: float = 0.0, targets="all-linear"):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    masks = random_masks(model, seed=masks_seed)
    masks.apply(model)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets))
    return peft_model, masks


def train_steps(model: nn.Module, steps: int = 5, lr: float = 1e-2, seed: int = 0) -> None:
    """A few AdamW steps on random tokens; large enough that every LoRA B leaves zero."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_masked_forward_matches_hand_computed_case():
    """One 2×3 layer: y = x · (W + s·(B·A) ⊙ M)^T, worked out by hand."""
    from peft import LoraConfig, get_peft_model

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 2, bias=False)

        def forward(self, x):
            return self.proj(x)

    net = One()
    keep = torch.tensor([[True, False, True], [False, True, False]])
    with torch.no_grad():
        net.proj.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 0.0]]))
    peft_net = get_peft_model(net, LoraConfig(r=1, lora_alpha=2, target_modules=["proj"]))  # scaling s = 2
    layer = lora_layers(peft_net)["proj"]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
        layer.lora_B["default"].weight.copy_(torch.tensor([[1.0], [-1.0]]))
    assert attach_masks(peft_net, MaskSet({"proj": keep})) == 1
    # B·A = [[1, 2, 3], [-1, -2, -3]]; ⊙M = [[1, 0, 3], [0, -2, 0]]; ×2 → [[2, 0, 6], [0, -4, 0]]
    # W_eff = [[3, 0, 8], [0, -5, 0]]; x = [1, 1, 1] → y = [11, -5]
    y = peft_net(torch.ones(1, 3))
    assert y.tolist() == [[11.0, -5.0]]
    assert layer.get_delta_weight("default").tolist() == [[2.0, 0.0, 6.0], [0.0, -4.0, 0.0]]


def test_merge_is_exact_and_keeps_every_pruned_weight_zero():
    peft_model, masks = pruned_lora_model()
    attach_masks(peft_model, masks)
    train_steps(peft_model)
    probe = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    merged, check = merge_masked(peft_model, masks, probe)
    assert check.violations == 0 and masks.violations(merged) == 0
    assert check.max_logit_diff is not None and check.max_logit_diff <= MERGE_TOLERANCE
    assert check.lora_layers == len(masks.masks)
    unprobed, unchecked = merge_masked(pruned_lora_model()[0], masks)  # no probe: zeros checked, logits not
    assert unchecked.max_logit_diff is None and unchecked.violations == 0
    # the merge really carries the training: the merged weights moved off the pruned base, on the mask only
    base = tiny_model("llama")
    masks.apply(base)
    moved = sum(int((merged.get_submodule(n).weight != base.get_submodule(n).weight).sum()) for n in masks.masks)
    assert moved > 0.5 * sum(int(m.sum()) for m in masks.masks.values())


def test_plain_peft_merge_breaks_sparsity(tmp_path):
    """The failure dlp exists to prevent: the same adapter, merged by plain peft, revives pruned weights."""
    from peft import PeftModel

    peft_model, masks = pruned_lora_model()
    attach_masks(peft_model, masks)
    train_steps(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    base = tiny_model("llama")
    masks.apply(base)
    plain = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))  # no attach_masks: peft's own layers
    assert not masked_lora_layers(plain)
    plain_merged = plain.merge_and_unload()
    total_pruned = sum(int((~m).sum()) for m in masks.masks.values())
    assert masks.violations(plain_merged) > 0.9 * total_pruned


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_masked_layer_and_its_gradients_equal_the_explicit_formula(autocast):
    """y, dA, dB and dx of the mask-exact layer equal autograd through x·(W + (s·B)·A ⊙ M)ᵀ written out. Under
    autocast (``bf16: true``) the layer computes and returns in bf16 as a plain Linear would, with W_eff built in
    float32 and rounded once."""
    peft_model, masks = pruned_lora_model()
    attach_masks(peft_model, masks)
    name, layer = next(iter(masked_lora_layers(peft_model).items()))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(2, 5, layer.get_base_layer().in_features, requires_grad=True)
    dtype = torch.bfloat16 if autocast else torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    A = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    W, M, s = layer.get_base_layer().weight.detach(), masks.masks[name].float(), layer.scaling["default"]
    y2 = x2.to(dtype) @ (W + (s * B) @ A * M).to(dtype).T
    exact = {"rtol": 0, "atol": 0} if autocast else {}  # in bf16 the same roundings in the same order: bitwise
    torch.testing.assert_close(y, y2, **exact)
    y2.float().square().sum().backward()
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, A.grad)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, B.grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_backward_keeps_no_weight_sized_tensor():
    """Between forward and backward a masked layer keeps x, A and B only: W_eff is rebuilt in backward (what
    keeps a 4-bit base 4-bit during training)."""
    peft_model, masks = pruned_lora_model()
    attach_masks(peft_model, masks)
    layer = masked_lora_layers(peft_model)["model.layers.0.mlp.down_proj"]
    weight = layer.get_base_layer().weight
    x = torch.randn(3, weight.shape[1], requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert sorted(t.numel() for t in saved) == sorted([x.numel(), 4 * weight.shape[1], weight.shape[0] * 4])
    y.sum().backward()
    assert x.grad is not None and layer.lora_A["default"].weight.grad is not None


def test_dropout_path_masks_the_delta_and_eval_is_exact():
    torch.manual_seed(0)
    peft_model, masks = pruned_lora_model(dropout=0.5)
    attach_masks(peft_model, masks)
    name, layer = next(iter(masked_lora_layers(peft_model).items()))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(4, layer.get_base_layer().in_features)
    layer.train()
    torch.manual_seed(1)
    y_train = layer(x)
    torch.manual_seed(1)
    dropped = layer.lora_dropout["default"](x)
    delta = layer.get_delta_weight("default")
    torch.testing.assert_close(y_train, x @ layer.get_base_layer().weight.T + dropped @ delta.T)
    assert (delta[~masks.masks[name]] == 0).all()
    layer.eval()
    torch.testing.assert_close(layer(x), x @ (layer.get_base_layer().weight + delta).T)


def test_adapters_on_unpruned_linears_stay_plain():
    peft_model, masks = pruned_lora_model()
    kept = {n: m for n, m in masks.masks.items() if not n.endswith("q_proj")}
    assert attach_masks(peft_model, MaskSet(kept)) == len(kept)
    for name, layer in lora_layers(peft_model).items():
        assert isinstance(layer, MaskedLoraMixin) == (name in kept)


def test_attach_masks_rejects_shape_mismatch_and_missing_layers():
    peft_model, masks = pruned_lora_model()
    name = next(iter(masks.masks))
    bad = MaskSet({name: torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(DlpError, match="shape"):
        attach_masks(peft_model, bad)
    with pytest.raises(DlpError, match="no LoRA layer wraps a pruned Linear"):
        attach_masks(peft_model, MaskSet({"nothing.here": torch.ones(2, 2, dtype=torch.bool)}))
    with pytest.raises(DlpError, match="no LoRA layers"):
        attach_masks(tiny_model("llama"), masks)


def test_disabled_adapter_and_merged_state_fall_back_to_the_base():
    peft_model, masks = pruned_lora_model()
    attach_masks(peft_model, masks)
    train_steps(peft_model, steps=2)
    ids = torch.randint(0, 128, (1, 12))
    base = tiny_model("llama")
    masks.apply(base)
    with torch.no_grad(), peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, base(input_ids=ids).logits)
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        peft_model.merge_adapter()
        for name, layer in masked_lora_layers(peft_model).items():
            assert (layer.get_base_layer().weight[~masks.masks[name]] == 0).all()
        torch.testing.assert_close(peft_model(input_ids=ids).logits, adapted, atol=MERGE_TOLERANCE, rtol=0)
        peft_model.unmerge_adapter()
        torch.testing.assert_close(peft_model(input_ids=ids).logits, adapted, atol=MERGE_TOLERANCE, rtol=0)
