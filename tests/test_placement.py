"""Where the sweep keeps hidden states (the device-memory budget), the per-micro-batch hook, and the timings every
report records. The CUDA decisions are checked with the device queries replaced by hand-set figures: this machine
has no GPU, and the arithmetic is what must be right."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_model
from dlp import placement
from dlp.errors import DlpError
from dlp.placement import GIB, Placement, check_memory_setting, device_budget, plan_placement, working_bytes
from dlp.scoring import score_layers
from dlp.resources import resources_line, timed
from dlp.sweep import sweep

CUDA = torch.device("cuda")


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 32)  # 8·32 + 32 = 288 parameters
        self.down = nn.Linear(32, 8)  # 32·8 + 8 = 264


@pytest.mark.parametrize("setting", ["auto", "host", "24", "0.5"])
def test_memory_settings_accepted(setting):
    check_memory_setting(setting)


@pytest.mark.parametrize("setting", ["", "0", "-1", "lots", "24GB"])
def test_bad_memory_settings_are_one_line(setting):
    with pytest.raises(DlpError, match=r"calibration_memory must be auto, host or a size in GiB > 0"):
        check_memory_setting(setting)


def test_working_set_estimate_by_hand():
    # widest projection 32; per token: 3 activations in float32 (4 bytes) + a float32 copy and its square
    assert working_bytes(_Block(), batch_tokens=10, dtype=torch.float32) == 10 * 32 * (3 * 4 + 2 * 4)
    assert working_bytes(_Block(), batch_tokens=10, dtype=torch.bfloat16) == 10 * 32 * (3 * 2 + 2 * 4)


def _needed(windows=4, seqlen=16, width=8, batch=2) -> int:
    hidden = windows * seqlen * width * 4  # float32
    layer = (288 + 264) * 4
    return 2 * hidden + layer + batch * seqlen * 32 * 20


def test_residency_needs_two_hidden_buffers_a_layer_and_a_micro_batch(monkeypatch):
    monkeypatch.setattr(placement, "device_budget", lambda _device, _setting: _needed())
    plan = plan_placement(CUDA, "auto", (4, 16, 8), torch.float32, _Block(), batch_size=2)
    assert plan == Placement(CUDA, CUDA, False, _needed(), _needed()) and plan.resident
    assert "resident on cuda" in plan.describe()


def test_over_budget_parks_hidden_states_in_pinned_host_memory(monkeypatch):
    monkeypatch.setattr(placement, "device_budget", lambda _device, _setting: _needed() - 1)
    plan = plan_placement(CUDA, "auto", (4, 16, 8), torch.float32, _Block(), batch_size=2)
    assert plan.store == torch.device("cpu") and plan.pinned and not plan.resident
    assert "parked in pinned host memory" in plan.describe()


def test_host_setting_always_parks_and_cpu_never_decides():
    plan = plan_placement(CUDA, "host", (4, 16, 8), torch.float32, _Block(), batch_size=2)
    assert plan.budget is None and plan.store == torch.device("cpu") and plan.pinned
    assert "calibration_memory: host" in plan.describe()
    cpu = plan_placement(torch.device("cpu"), "auto", (4, 16, 8), torch.float32, _Block(), batch_size=2)
    assert cpu.resident and not cpu.pinned and cpu.needed == _needed()


def test_auto_budget_respects_a_per_process_cap(monkeypatch):
    """80% of min(free on the device, what the per-process cap leaves this process)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _device: (40 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda _device: 0.3, raising=False)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda _device: 4 * GIB)
    assert device_budget(CUDA, "auto") == int(0.8 * (24 * GIB - 4 * GIB))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda _device: 1.0, raising=False)
    assert device_budget(CUDA, "auto") == int(0.8 * 40 * GIB)  # no cap: what is free
    assert device_budget(CUDA, "2.5") == int(2.5 * GIB) and device_budget(CUDA, "host") is None


def test_on_batch_sees_every_micro_batch_and_the_redundancy_matches_the_models_hidden_states(calib_ids):
    model = tiny_model("llama")
    with torch.no_grad():
        states = model(calib_ids, output_hidden_states=True).hidden_states
    seen = []

    def visit(ctx):
        return ctx.forward(on_batch=lambda x, y: seen.append((ctx.index, x.shape[0], y.shape)))

    sweep(model, calib_ids, visit, batch_size=2)
    windows = calib_ids.shape[0]
    assert [s[1] for s in seen if s[0] == 0] == [min(2, windows - i) for i in range(0, windows, 2)]
    scores = score_layers(tiny_model("llama"), calib_ids, batch_size=2)
    for layer in range(len(states) - 2):  # the last entry of hidden_states has the final norm applied
        expected = F.cosine_similarity(states[layer], states[layer + 1], dim=-1).mean()
        assert scores[layer].redundancy == pytest.approx(float(expected), abs=1e-5)


def test_a_sweep_holds_two_hidden_buffers_not_three(calib_ids):
    """Once layer 0 has run, nothing holds the captured inputs any more: their memory is free for later layers."""
    refs = []

    def visit(ctx):
        if ctx.index == 1:
            gc.collect()
            assert refs[0]() is None, "layer 0's inputs are still held during layer 1"
        refs.append(weakref.ref(ctx.inputs))
        return ctx.forward()

    sweep(tiny_model("llama"), calib_ids, visit, batch_size=2)
    assert len(refs) == 3


def test_timed_adds_up_and_the_resources_line_reads_them():
    timings: dict[str, float] = {}
    for _ in range(2):
        with timed(timings, "eval_pruned"):
            pass
    assert list(timings) == ["eval_pruned_s"] and timings["eval_pruned_s"] >= 0
    line = resources_line({"load_s": 1.25, "eval_pruned_s": 2.0}, {"host_mib": 2048.0, "device_mib": 512.0})
    assert line == "- wall time: load 1.2 s · eval pruned 2.0 s; peak memory: host 2.00 GiB, device 0.50 GiB"
