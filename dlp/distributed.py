"""What running on several processes needs beyond the trainer: ZeRO-3 awareness and agreement on the masks.

Pruning, merging and evaluating run on the main process alone while the others wait. Inside a ZeRO-3 run,
``from_pretrained`` would partition any model it loads over all ranks (``zero.Init``), which deadlocks when only
one rank loads; :func:`zero3_init_disabled` loads plainly there. Training, which every rank runs, keeps ZeRO-3's
partitioned loading, so a large base is never whole on any rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .errors import DlpError


def zero3_enabled() -> bool:
    """True inside a DeepSpeed ZeRO-3 run (as set up by ``accelerate launch`` or the trainer)."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return is_deepspeed_zero3_enabled()


@contextlib.contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Inside, ``from_pretrained`` loads whole models on this process even in a ZeRO-3 run."""
    if not zero3_enabled():
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    config = hf_deepspeed._hf_deepspeed_config_weak_ref()  # the one switch transformers reads; no public getter
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def check_same_masks(digest: str, state) -> None:
    """Every rank must train under the same masks: compare the digests and fail on all ranks if any differs.

    Ranks read the masks the main process wrote; a node that does not share ``output_dir`` (or a stale copy)
    would otherwise train, and merge, under different masks without a word.
    """
    if state.num_processes == 1:
        return
    import torch.distributed as dist

    digests: list[str | None] = [None] * state.num_processes
    dist.all_gather_object(digests, digest)
    differ = [rank for rank, other in enumerate(digests) if other != digests[0]]
    if differ:
        raise DlpError(
            f"masks: rank {differ[0]} holds masks {digests[differ[0]][:12]}… but rank 0 holds "
            f"{digests[0][:12]}…; every rank must read the same prune/masks.safetensors "
            "(is output_dir on a filesystem all nodes share?)"
        )


def describe_zero3_shards(model, state) -> None:
    """Under ZeRO-3, print how much of the base model this rank holds (what partitioned loading saved); else
    nothing."""
    if not zero3_enabled():
        return
    shards = [p for p in model.parameters() if hasattr(p, "ds_numel")]
    held, total = sum(p.ds_tensor.numel() for p in shards), sum(p.ds_numel for p in shards)
    print(
        f"[dlp] ZeRO-3: rank {state.process_index} holds {held:,} of {total:,} base weights "
        f"({100 * held / max(total, 1):.0f}%)"
    )
