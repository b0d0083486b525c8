"""What ``accelerate.Accelerator.save_state`` saves, as one async_ckpt state dict.

``accelerator_state(accelerator)`` gathers the prepared models, optimizers,
LR schedulers, the gradient scaler, the objects given to
``register_for_checkpointing``, the accelerator's step and this rank's RNG
state into a dict that ``AsyncCheckpointer.save`` (or ``ac.save``) takes as it
is; add your own entries to it (the training step, the epoch).
``load_accelerator_state(accelerator, checkpoint_id)`` puts them all back,
as ``Accelerator.load_state`` does.

Only plain and DDP runs: DeepSpeed, FSDP and Megatron-LM engines checkpoint
themselves, and are refused.
"""

from __future__ import annotations

import os
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType

from ..api import load, load_state_dict, read_metadata
from ..single_rank import SINGLE_RANK
from ._rng import capture_rng, restore_rng

__all__ = ["accelerator_state", "load_accelerator_state"]

_ENGINES = {DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM}


def accelerator_state(accelerator: Accelerator) -> dict[str, Any]:
    """The live objects ``save_state`` would save, plus this rank's RNG state (captured now)."""
    state = _objects(accelerator)
    # Keyed by rank: each rank's generators differ, and a key is written once per checkpoint.
    state["rng"] = {accelerator.process_index: capture_rng()}
    return state


def load_accelerator_state(accelerator: Accelerator, checkpoint_id: str | os.PathLike[str]) -> None:
    """Restore what ``accelerator_state`` saved into ``accelerator``'s prepared objects (collective)."""
    target = _objects(accelerator)
    load(target, checkpoint_id)
    accelerator.step = target["step"]
    rank = accelerator.process_index
    key = f"rng.{rank}"
    md = read_metadata(checkpoint_id)
    if any(k == key or k.startswith(key + ".") for k in (*md.tensors, *md.values)):
        # Each rank reads its own generators: no collective needed.
        restore_rng(load_state_dict(checkpoint_id, keys=[key], process_group=SINGLE_RANK)["rng"][rank])


def _objects(accelerator: Accelerator) -> dict[str, Any]:
    if accelerator.distributed_type in _ENGINES:
        raise ValueError(
            f"accelerator_state covers plain and DDP runs; a {accelerator.distributed_type.value} run "
            "checkpoints through its engine: use Accelerator.save_state"
        )
    state: dict[str, Any] = {"step": accelerator.step}
    # Unwrapped, so the keys are the model's own (no DDP "module." prefix) and load into either form.
    state.update({f"model_{i}": accelerator.unwrap_model(m) for i, m in enumerate(accelerator._models)})
    state.update({f"optimizer_{i}": o for i, o in enumerate(accelerator._optimizers)})
    state.update({f"scheduler_{i}": s for i, s in enumerate(accelerator._schedulers)})
    state.update({f"custom_{i}": obj for i, obj in enumerate(accelerator._custom_objects)})
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler
    return state
