"""The one layer-by-layer calibration engine.

Every calibration-driven computation in dlp (layer scores for the allocators, Wanda/SparseGPT pruning, the
fast one-pass mode) is a *visitor* run by :func:`sweep`. The engine

1. captures the hidden states (and the keyword arguments: attention mask, rotary embeddings, ...) that enter
   every decoder layer, by running the model once with each layer replaced by a recording stub, so nothing
   but embeddings is computed and per-layer arguments (sliding-window masks) are exact;
2. moves one decoder layer at a time to the compute device, hands it to the visitor together with the
   hidden states entering it, and feeds whatever the visitor returns to the next layer. A visitor that
   prunes and then re-runs the layer makes the sweep *sequential*: layer l+1 is calibrated on the outputs
   of the already-pruned layer l.

Where the hidden states of all windows live between layer forwards (on the device, or parked in pinned host
memory) is decided once per sweep by a device-memory budget: see :mod:`dlp.placement`.

Calibration always runs with ``use_cache=False`` and no ``past_key_values``: a cache captured with the first
layer's inputs and handed to every layer call would make each call attend to earlier samples.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .modeling import find_decoder_layers, find_linears
from .placement import Placement, plan_placement
from .resources import synchronize


class _StopForward(Exception):
    """Raised by the last recording stub: nothing after the decoder stack is needed."""


class _TupleOutputs(Exception):
    """Raised when the model indexes a layer's output as a tuple; the capture is redone returning tuples."""


class _RecordingStub(nn.Module):
    """Stands in for decoder layer ``index`` during capture: records its call, returns the input unchanged.

    Non-module attributes (``attention_type`` and the like, read by some models' forward) are looked up on the
    real layer, which is held outside the module tree so it is never moved to the compute device.
    """

    def __init__(self, index: int, real: nn.Module, recorder: "_Recorder"):
        super().__init__()
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_recorder", recorder)
        self.index = index

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        return self._recorder.record(self.index, hidden, args[1:], kwargs)


@dataclass
class _Recorder:
    """Collects what enters each layer. The first micro-batch decides where all windows' hidden states will live
    (``place``), and the buffer for all of them is allocated there once and filled batch by batch."""

    num_layers: int
    windows: int
    place: Callable[[torch.Tensor], Placement]
    tuple_outputs: bool = False
    hidden: torch.Tensor | None = None
    placement: Placement | None = None
    filled: int = 0
    calls: list[list[tuple[tuple, dict]]] = field(default_factory=list)  # [micro-batch][layer] -> (args, kwargs)
    _expected_shape: torch.Size | None = None

    def record(self, index: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        if index == 0:
            self._store(hidden.detach())
            self.calls.append([])
        elif hidden.shape != self._expected_shape:
            raise _TupleOutputs()
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        self.calls[-1].append((args, kwargs))
        if index == self.num_layers - 1:
            raise _StopForward()
        self._expected_shape = hidden.shape
        return (hidden,) if self.tuple_outputs else hidden

    def _store(self, hidden: torch.Tensor) -> None:
        if self.hidden is None:
            self.placement = self.place(hidden)
            shape = (self.windows, *hidden.shape[1:])
            pinned = self.placement.pinned
            self.hidden = torch.empty(shape, dtype=hidden.dtype, device=self.placement.store, pin_memory=pinned)
        rows = hidden.shape[0]
        self.hidden[self.filled : self.filled + rows].copy_(hidden, non_blocking=self.placement.pinned)
        self.filled += rows


@dataclass
class CapturedInputs:
    """What enters the decoder stack for every calibration micro-batch."""

    hidden: torch.Tensor  # [nsamples, seqlen, hidden] where ``placement.store`` says
    calls: list[list[tuple[tuple, dict]]]  # [micro-batch][layer] -> (extra positional args, kwargs)
    batch_size: int
    tuple_outputs: bool
    placement: Placement


@contextmanager
def _layers_replaced(layers: nn.ModuleList, recorder: _Recorder) -> Iterator[None]:
    real = list(layers)
    try:
        for index, layer in enumerate(real):
            layers[index] = _RecordingStub(index, layer, recorder)
        yield
    finally:
        for index, layer in enumerate(real):
            layers[index] = layer


@torch.no_grad()
def capture_inputs(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int, device: torch.device, memory: str = "auto"
) -> CapturedInputs:
    """Run the model with recording stubs to collect every layer's inputs; only non-layer modules compute.

    ``memory`` is the ``calibration_memory`` setting that places the hidden states (:mod:`dlp.placement`)."""
    device = _indexed(device)
    _, layers = find_decoder_layers(model)
    offload = input_ids.device if input_ids.device.type != "meta" else torch.device("cpu")

    def place(first: torch.Tensor) -> Placement:
        shape = (input_ids.shape[0], *first.shape[1:])
        return plan_placement(device, memory, shape, first.dtype, layers[0], batch_size)

    for tuple_outputs in (False, True):
        recorder = _Recorder(len(layers), input_ids.shape[0], place, tuple_outputs)
        with _layers_replaced(layers, recorder):
            model.to(device)  # the stubs hold no parameters: only embeddings, norms and the head move
            try:
                for start in range(0, input_ids.shape[0], batch_size):
                    try:
                        model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
                    except _StopForward:
                        pass
            except _TupleOutputs:
                continue
            finally:
                model.to(offload)
        synchronize(device)
        return CapturedInputs(recorder.hidden, recorder.calls, batch_size, tuple_outputs, recorder.placement)
    raise RuntimeError("could not capture decoder-layer inputs: the layers' outputs have an unknown structure")


def _indexed(device: torch.device | str) -> torch.device:
    """``cuda`` as ``cuda:<current>``: tensors report their device with its index, and comparing the two is how
    the sweep tells resident hidden states from parked ones."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class LayerContext:
    """One decoder layer during a sweep, as seen by a visitor."""

    index: int
    layer: nn.Module
    linears: dict[str, nn.Module]  # the block's prunable projections (nn.Linear or GPT-2's Conv1D)
    inputs: torch.Tensor  # hidden states entering the layer, [nsamples, seqlen, hidden], where the placement says
    device: torch.device
    _captured: CapturedInputs
    is_last: bool = False  # the last decoder layer: nothing downstream needs its outputs

    @torch.no_grad()
    def forward(self, keep_outputs: bool = True, on_batch: BatchHook | None = None) -> torch.Tensor | None:
        """Run the layer over all calibration samples, micro-batch by micro-batch (batch size of the capture).

        ``on_batch(inputs, outputs)`` sees each micro-batch on the compute device, so a visitor can reduce it
        there (the LR cosine) instead of reading the whole outputs back from wherever they are stored. Parked
        hidden states are copied without blocking; the one synchronisation is at the end."""
        outputs = None  # allocated from the first result: a sliced layer's outputs may be wider than its inputs
        size = self._captured.batch_size
        parked = self.inputs.device != self.device
        for batch, start in enumerate(range(0, self.inputs.shape[0], size)):
            args, kwargs = self._captured.calls[batch][self.index]
            part = self.inputs[start : start + size].to(self.device, non_blocking=parked)
            result = self.layer(part, *args, **kwargs)
            if isinstance(result, (tuple, list)):
                result = result[0]
            if on_batch is not None:
                on_batch(part, result)
            if keep_outputs and outputs is None:
                shape = (self.inputs.shape[0], *result.shape[1:])
                pinned = self.inputs.is_pinned()
                outputs = torch.empty(shape, dtype=result.dtype, device=self.inputs.device, pin_memory=pinned)
            if outputs is not None:
                outputs[start : start + size].copy_(result, non_blocking=parked)
        if parked:
            synchronize(self.device)
        return outputs


BatchHook = Callable[[torch.Tensor, torch.Tensor], None]
Visitor = Callable[[LayerContext], torch.Tensor]


def sweep(
    model: nn.Module,
    input_ids: torch.Tensor,
    visit: Visitor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    desc: str = "sweep",
    captured: CapturedInputs | None = None,
    memory: str = "auto",
) -> None:
    """Visit every decoder layer in order; the visitor returns the hidden states for the next layer.

    Only the layer being visited is moved to ``device``; the rest of the model stays where it is. ``memory``
    (``calibration_memory``) decides where the hidden states live (:mod:`dlp.placement`); the choice is printed
    on a GPU. A sweep that captures its own inputs lets go of them after layer 0, so only two hidden-state
    buffers (a layer's inputs and outputs) are ever held; ``captured`` from the caller is left as it was.
    """
    device = _indexed(device)
    _, layers = find_decoder_layers(model)
    hidden = None
    if captured is None:
        captured = capture_inputs(model, input_ids, batch_size, device, memory)
        hidden, captured.hidden = captured.hidden, None
        if device.type == "cuda":
            print(f"[dlp] {captured.placement.describe()}")
    hidden = captured.hidden if hidden is None else hidden
    for index in tqdm(range(len(layers)), desc=desc, unit="layer"):
        layer = layers[index]
        home = next(layer.parameters()).device
        layer.to(device)
        context = LayerContext(index, layer, find_linears(layer), hidden, device, captured, index == len(layers) - 1)
        hidden = visit(context)
        del context  # the layer's inputs are free before the next layer allocates its outputs
        layer.to(home)
