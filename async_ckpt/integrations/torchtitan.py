"""torchtitan checkpoint backend: ``AsyncCkptCheckpointManager``.

torchtitan (0.3) picks its checkpointer by the class of ``Trainer.Config.checkpoint``:
a ``BaseCheckpointManager.Config`` subclass builds its owner. So::

    from async_ckpt.integrations.torchtitan import AsyncCkptCheckpointManager

    config.checkpoint = AsyncCkptCheckpointManager.Config(enable=True, interval=500, keep_latest_k=3)

The manager stages each save with ``overlap=True`` (the copy runs on a helper
thread while forward and backward run) and waits for the copy in
``maybe_wait_for_staging``, which torchtitan calls right before
``optimizers.step()``. ``save_future`` resolves when the checkpoint commits.
Retention (``keep_latest_k``) is ``async_ckpt.CheckpointManager``'s; the
latest step is the newest ``step-<n>`` directory holding ``metadata.json`` or,
for a run that torchtitan's default manager started, DCP's ``.metadata``: such
checkpoints load as they are.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torchtitan.components.checkpointer.base import (
    DATALOADER,
    LR_SCHEDULER,
    MODEL,
    OPTIMIZER,
    BaseCheckpointManager,
    ModelWrapper,
)
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.tools import filesystem

from ..api import load
from ..checkpointer import AsyncCheckpointer, PendingCheckpoint
from ..errors import CheckpointError
from ..manager import CheckpointManager

if TYPE_CHECKING:
    import torch.nn as nn

__all__ = ["HF_EXPORT_PREFIX", "AsyncCkptCheckpointManager"]

HF_EXPORT_PREFIX = "hf-step-"
"""The last step's Hugging Face export goes to ``<folder>/hf-step-<n>``: a ``step-<n>``
directory without ``metadata.json`` would be taken for an interrupted save by retention."""


class AsyncCkptCheckpointManager(BaseCheckpointManager):
    """torchtitan's checkpoint manager contract, saved and loaded by async_ckpt.

    Built by torchtitan's ``Trainer`` from its ``Config`` with the same keyword
    arguments as torchtitan's own ``CheckpointManager``.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseCheckpointManager.Config):
        overlap: bool = True
        """Stage on a helper thread while training goes on; wait for it before the optimizer step."""

        max_in_flight: int = 1
        """Saves that may hold staging buffers at once (host memory: that many copies of the state)."""

        keep_every: int = 0
        """Also keep every step divisible by this (0: none), on top of ``keep_latest_k``."""

        timeout: float = 600.0
        """Seconds any rank waits for another during a save."""

        start_worker: bool = True
        """Start the background worker when the manager is built (a collective), not in the first save."""

        def __post_init__(self) -> None:
            BaseCheckpointManager.Config.__post_init__(self)
            if self.max_in_flight < 1:
                raise ValueError("max_in_flight must be at least 1.")
            if self.keep_every < 0:
                raise ValueError("keep_every cannot be negative.")
            if not self.timeout > 0:
                raise ValueError("timeout must be positive.")

    def __init__(
        self,
        config: Config,
        *,
        dataloader: Any,
        model_parts: list[nn.Module],
        optimizers: Any,
        lr_schedulers: Any,
        states: dict[str, Any],
        sd_adapter: Any = None,
        base_folder: str = "",
    ) -> None:
        self.enable = config.enable
        self.save_future: concurrent.futures.Future[Any] | None = None
        if not self.enable:
            return
        self.folder = filesystem.join(base_folder, config.folder)
        self.interval = config.interval
        self.states = states
        self.states.update(
            {
                MODEL: ModelWrapper(model_parts),
                OPTIMIZER: optimizers,
                DATALOADER: dataloader,
                LR_SCHEDULER: lr_schedulers,
            }
        )
        self.load_only = config.load_only
        self.exclude_from_loading = list(config.exclude_from_loading)
        self.initial_load_path = config.initial_load_path
        self.initial_load_model_only = config.initial_load_model_only
        self.initial_load_in_hf = config.initial_load_in_hf
        self.initial_load_in_hf_quantized = config.initial_load_in_hf_quantized
        self.enable_first_step_checkpoint = config.enable_first_step_checkpoint
        self.last_save_model_only = config.last_save_model_only
        self.last_save_in_hf = config.last_save_in_hf
        self.export_dtype = TORCH_DTYPE_MAP[config.export_dtype]
        self.overlap = config.overlap
        self.sd_adapter = sd_adapter
        if self.last_save_in_hf and sd_adapter is None:
            raise ValueError("checkpoint.last_save_in_hf is True, but sd_adapter is not provided.")
        # A CPU group of our own, as torchtitan's async modes do: the default
        # group may be NCCL, and our planning exchanges Python objects.
        self.pg = dist.new_group(backend="gloo") if dist.is_initialized() else None
        # Started here, the worker's start-up (a process, a group of its own) is paid
        # while torchtitan builds the trainer, not by the step after the first save.
        self._checkpointer = AsyncCheckpointer(
            self.pg, config.max_in_flight, timeout=config.timeout, start=config.start_worker
        )
        self._manager = CheckpointManager(
            self.folder,
            keep_last=config.keep_latest_k or None,
            keep_every=config.keep_every or None,
            process_group=self.pg,
            checkpointer=self._checkpointer,
            timeout=config.timeout,
        )
        self._pending: PendingCheckpoint | None = None
        """The last save, until its staging copy is done."""

    def __del__(self) -> None:
        self.close()

    # ---------------------------------------------------------------- saving

    @torch.no_grad()
    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        if not self._should_save(curr_step, last_step):
            return False
        # One save at a time, as torchtitan's managers do: a save that has not
        # committed yet is not counted on by the next one's retention.
        self.maybe_wait_for_saving()
        if last_step:
            self._save_last_step(curr_step)
            return True
        self._start_save(curr_step, self._flattened_states(self.states), overlap=self.overlap)
        return True

    def _start_save(self, step: int, states: dict[str, Any], *, overlap: bool) -> None:
        pending = self._manager.save(step, states, overlap=overlap)
        self._pending = pending
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()

        def settle(p: PendingCheckpoint) -> None:
            exc = p.exception()
            if exc is None:
                future.set_result(p.result())
            else:
                future.set_exception(exc)

        pending.add_done_callback(settle)
        self.save_future = future

    def _save_last_step(self, curr_step: int) -> None:
        if not self.last_save_model_only:
            self._start_save(curr_step, self._flattened_states(self.states), overlap=False)
            self.maybe_wait_for_saving()
            return
        model_sd = {
            k: v.to(self.export_dtype)
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != self.export_dtype
            else v
            for k, v in self.states[MODEL].state_dict().items()
        }
        if self.last_save_in_hf:
            self._export_hf(curr_step, model_sd)
            return
        self._start_save(curr_step, model_sd, overlap=False)
        self.maybe_wait_for_saving()

    def _export_hf(self, step: int, model_sd: dict[str, Any]) -> None:
        """Write the model as Hugging Face safetensors under ``<folder>/hf-step-<step>``."""
        from safetensors.torch import save_file

        hf_sd = self.sd_adapter.to_hf(model_sd)
        full = {}
        for key in sorted(hf_sd):
            value = hf_sd[key]
            # full_tensor() is a collective: every rank runs it, in the same key order.
            full_value = value.full_tensor() if hasattr(value, "full_tensor") else value
            full[key] = full_value.detach().to("cpu").contiguous()
        if self.pg is not None and dist.get_rank() != 0:
            dist.barrier(group=self.pg)
            return
        out = Path(self.folder) / f"{HF_EXPORT_PREFIX}{step}"
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(full, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in full.values())},
            "weight_map": dict.fromkeys(full, "model.safetensors"),
        }
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if out.exists():
            filesystem.rmtree(str(out))
        os.replace(tmp, out)
        if self.pg is not None:
            dist.barrier(group=self.pg)

    def _should_save(self, curr_step: int, last_step: bool) -> bool:
        if self.load_only:
            return False
        if curr_step == 1 and self.enable_first_step_checkpoint:
            return True
        return last_step or curr_step % self.interval == 0

    def _maybe_wait_for_staging(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.staged.wait()

    def _wait_for_saving(self) -> None:
        future, self.save_future = self.save_future, None
        assert future is not None
        self._maybe_wait_for_staging()
        future.result()

    def _close(self) -> None:
        if hasattr(self, "_manager"):
            self._checkpointer.close()  # waits for the saves in flight
            self._manager.close()  # then for their retention

    # --------------------------------------------------------------- loading

    @torch.no_grad()
    def _load(self, step: int = -1) -> bool:
        latest = self._latest_step()
        if step != -1 and latest == -1 and not filesystem.exists(self.folder):
            raise FileNotFoundError(
                f"--checkpoint.load_step={step} not found because checkpoint.folder "
                f"{self.folder} does not exist"
            )
        load_step = latest if step == -1 else step
        if load_step == -1:
            return self._initial_load()
        states = self._states_to_load(model_only=load_step == 0)
        self._manager.restore(states, load_step)
        self.states[MODEL].load_state_dict(states)
        return True

    def _latest_step(self) -> int:
        """The newest committed step (ours or DCP's), as rank 0 of ``pg`` sees it."""
        latest = [self._manager.latest()]
        if self.pg is not None:
            dist.broadcast_object_list(latest, src=dist.get_global_rank(self.pg, 0), group=self.pg)
        return -1 if latest[0] is None else int(latest[0])

    def _initial_load(self) -> bool:
        if not self.initial_load_path:
            if self.initial_load_in_hf:
                raise CheckpointError(
                    "checkpoint.initial_load_in_hf without checkpoint.initial_load_path: "
                    "AsyncCkptCheckpointManager loads Hugging Face weights only from initial_load_path"
                )
            return False
        if self.initial_load_in_hf:
            self._load_hf(self.initial_load_path)
            return True
        states = self._states_to_load(model_only=self.initial_load_model_only)
        load(states, self.initial_load_path, process_group=self.pg)
        self.states[MODEL].load_state_dict(states)
        return True

    def _load_hf(self, path: str) -> None:
        # Hugging Face checkpoints are read by torchtitan's own adapter and DCP's HF reader.
        import torch.distributed.checkpoint as dcp

        hf_sd = self.sd_adapter.to_hf(self.states[MODEL].state_dict())
        reader = self.sd_adapter.get_hf_storage_reader(path, self.initial_load_in_hf_quantized)
        dcp.load(hf_sd, storage_reader=reader)
        self.states[MODEL].load_state_dict(self.sd_adapter.from_hf(hf_sd))

    def _states_to_load(self, model_only: bool) -> dict[str, Any]:
        if model_only:
            return dict(self.states[MODEL].state_dict())
        for key in self.exclude_from_loading:
            if key not in self.states:
                raise ValueError(f"{key} not found in state_dict.")
        return self._flattened_states(
            {k: v for k, v in self.states.items() if k not in self.exclude_from_loading}
        )

    @staticmethod
    def _flattened_states(states: dict[str, Any]) -> dict[str, Any]:
        # torchtitan's layout: model parameters at the top level, the other states under their names.
        sd = {k: v for k, v in states.items() if k != MODEL and v is not None}
        if MODEL in states:
            sd.update(states[MODEL].state_dict())
        return sd
