"""``transformers.Trainer`` checkpoints saved in the background by async_ckpt.

``AsyncCheckpointMixin`` overrides the Trainer's checkpoint hooks: each
``checkpoint-<step>`` is one async_ckpt checkpoint holding the model, the
optimizer, the LR scheduler, the gradient scaler, every rank's RNG state and
the ``TrainerState``. Training goes on as soon as the state is staged. The
directory appears only when the save commits (it is renamed into place), so
``resume_from_checkpoint=True`` never picks a half-written one; Trainer's own
``trainer_state.json`` is written into it right after the commit.

Resuming reads these checkpoints, and still reads the Trainer's own format,
so a run checkpointed by the stock Trainer continues under this one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import Trainer
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    SaveStrategy,
    get_last_checkpoint,
    rotate_checkpoints,
)

from ..api import load, load_state_dict, read_metadata
from ..checkpointer import AsyncCheckpointer, PendingCheckpoint
from ..errors import CheckpointError
from ..format.metadata import METADATA_FILE, SaveStats
from ..single_rank import SINGLE_RANK
from ..storage import LocalStorage
from ._rng import capture_rng, restore_rng

__all__ = ["TRAINER_STATE_NAME", "AsyncCheckpointMixin", "AsyncCheckpointTrainer", "is_async_checkpoint"]

log = logging.getLogger("async_ckpt")

TRAINER_STATE_NAME = "trainer_state.json"

# The mixin is typed as a Trainer for the checker; at run time it is a plain class placed before Trainer.
_Base: Any = Trainer if TYPE_CHECKING else object


def is_async_checkpoint(path: str | os.PathLike[str] | None) -> bool:
    """Whether ``path`` is a committed async_ckpt checkpoint (rather than one in Trainer's format)."""
    return path is not None and os.path.isfile(os.path.join(path, METADATA_FILE))


class AsyncCheckpointMixin(_Base):
    """Put before ``Trainer`` (or a subclass of it): ``class MyTrainer(AsyncCheckpointMixin, Trainer)``.

    ``async_checkpointer``: an ``AsyncCheckpointer`` to save with; you then
    own its lifetime. By default ``train()`` starts one (``max_in_flight=1``,
    its worker started before the first step) and closes it when it returns,
    after every save has committed. A failed save raises at the next checkpoint or at the end of
    ``train()``.
    """

    def __init__(
        self, *args: Any, async_checkpointer: AsyncCheckpointer | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._async_ckpt = async_checkpointer
        self._owns_async_ckpt = async_checkpointer is None
        self._pending_saves: list[PendingCheckpoint] = []
        self._stats_lock = threading.Lock()
        self.async_save_stats: list[SaveStats] = []
        """``SaveStats`` of each committed save, in commit order (stall, stage, write ... seconds)."""

    # ---- training entry point ----

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        self._refuse_unsupported()
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if isinstance(resume_from_checkpoint, str | os.PathLike) and is_async_checkpoint(
            resume_from_checkpoint
        ):
            resume_from_checkpoint = os.fspath(resume_from_checkpoint)
            _ensure_trainer_state_file(resume_from_checkpoint)
        if self.args.should_save and not self._pending_saves and os.path.isdir(self.args.output_dir):
            # Nothing of ours is saving here now, so hidden staging directories are interrupted saves.
            for leftover in LocalStorage().remove_uncommitted(self.args.output_dir):
                log.info("removed %s, left by an interrupted save", leftover)
        if self._async_ckpt is None and self.args.save_strategy != SaveStrategy.NO:
            # Start the worker now (collective across ranks), so the first save does not wait for it.
            self._async_ckpt = AsyncCheckpointer(max_in_flight=1, start=True)
        try:
            result = super().train(resume_from_checkpoint, *args, **kwargs)
        except BaseException:
            self._finish_saves(raise_errors=False)
            raise
        self._finish_saves(raise_errors=True)
        return result

    def _refuse_unsupported(self) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "AsyncCheckpointMixin saves plain and DDP-replicated models; DeepSpeed and FSDP runs "
                "checkpoint through their own engines: use the stock Trainer for them"
            )

    # ---- saving ----

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        self._raise_failed_saves()
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        output_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self._track_best_checkpoint(run_dir, output_dir)
        if self.args.should_save:
            self._export_callback_states()
        trainer_state = json.dumps(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n"
        state: dict[str, Any] = {"model": self.model, "trainer_state": trainer_state}
        if not self.args.save_only_model:
            state["optimizer"] = self.optimizer
            state["lr_scheduler"] = self.lr_scheduler
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                state["scaler"] = scaler
            # Keyed by rank: each rank's generators differ, and a key is written once per checkpoint.
            state["rng"] = {self.args.process_index: capture_rng()}
        pending = self._checkpointer().save(state, output_dir)
        self._pending_saves.append(pending)
        should_save = self.args.should_save
        pending.add_done_callback(lambda p: self._on_committed(p, trainer_state, should_save))
        if self.args.push_to_hub:
            log.warning(
                "async_ckpt checkpoints are not pushed to the Hub; push the final model after training"
            )
        if should_save:
            self._rotate(run_dir)

    def _checkpointer(self) -> AsyncCheckpointer:
        if self._async_ckpt is None:
            self._async_ckpt = AsyncCheckpointer(max_in_flight=1)
        return self._async_ckpt

    def _on_committed(self, pending: PendingCheckpoint, trainer_state: str, should_save: bool) -> None:
        # Runs on the checkpointer's thread once the save settles.
        if pending.exception() is not None:
            return
        stats = pending.result().stats
        if stats is not None:
            with self._stats_lock:
                self.async_save_stats.append(stats)
        if should_save:
            _write_atomically(Path(os.fspath(pending.checkpoint_id)) / TRAINER_STATE_NAME, trainer_state)

    def _export_callback_states(self) -> None:
        # As Trainer._save_checkpoint: callbacks that carry state go into TrainerState.
        for cb in [*self.callback_handler.callbacks, self.control]:
            if not isinstance(cb, ExportableState):
                continue
            name = cb.__class__.__name__
            if isinstance(self.state.stateful_callbacks[name], list):
                self.state.stateful_callbacks[name].append(cb.state())
            else:
                self.state.stateful_callbacks[name] = cb.state()

    def _track_best_checkpoint(self, run_dir: str, output_dir: str) -> None:
        strategies = (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
        if self.args.save_strategy not in strategies or not self.state.best_global_step:
            return
        best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
        # The best step may be the one about to be saved, or still saving: its directory appears
        # only when it commits.
        in_flight = best == output_dir or any(os.fspath(p.checkpoint_id) == best for p in self._pending_saves)
        if in_flight or os.path.exists(best):
            self.state.best_model_checkpoint = best

    def _rotate(self, run_dir: str) -> None:
        # Saves in flight are not directories yet, so only committed checkpoints are counted and removed.
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=False,
        )

    def _raise_failed_saves(self) -> None:
        done = [p for p in self._pending_saves if p.done()]
        self._pending_saves = [p for p in self._pending_saves if not p.done()]
        for p in done:
            if (exc := p.exception()) is not None:
                raise CheckpointError(f"saving Trainer checkpoint {p.checkpoint_id} failed: {exc}") from exc

    def _finish_saves(self, *, raise_errors: bool) -> None:
        errors: list[tuple[PendingCheckpoint, BaseException]] = []
        for p in self._pending_saves:
            try:
                p.result()
            except Exception as failure:  # noqa: BLE001 - every failure is reported below
                errors.append((p, failure))
        self._pending_saves = []
        if self._owns_async_ckpt and self._async_ckpt is not None:
            self._async_ckpt.close()
            self._async_ckpt = None
        if self.args.should_save and not errors:
            self._rotate(self._get_output_dir(trial=None))
        for failed, why in errors:
            log.error("saving Trainer checkpoint %s failed: %s", failed.checkpoint_id, why)
        if errors and raise_errors:
            first, cause = errors[0]
            raise CheckpointError(
                f"saving Trainer checkpoint {first.checkpoint_id} failed: {cause}"
            ) from cause

    # ---- resuming ----

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not is_async_checkpoint(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        load({"model": self.model if model is None else model}, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        # The best checkpoint may be the last one, still being written (its directory appears on commit).
        for p in self._pending_saves:
            if os.fspath(p.checkpoint_id) == best:
                p.result()
        if not is_async_checkpoint(best):
            super()._load_best_model()
            return
        log.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
        load({"model": self.model}, best)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not is_async_checkpoint(checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        saved = _saved_roots(checkpoint)
        target: dict[str, Any] = {k: getattr(self, k) for k in ("optimizer", "lr_scheduler") if k in saved}
        if target:
            load(target, checkpoint)

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not is_async_checkpoint(checkpoint):
            super()._load_scaler(checkpoint)
            return
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and "scaler" in _saved_roots(checkpoint):
            load({"scaler": scaler}, checkpoint)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None or not is_async_checkpoint(checkpoint):
            super()._load_rng_state(checkpoint)
            return
        rank = self.args.process_index
        key = f"rng.{rank}"
        md = read_metadata(checkpoint)
        if not any(k == key or k.startswith(key + ".") for k in (*md.tensors, *md.values)):
            log.info(
                "%s holds no RNG state for process %d: reproducibility is not guaranteed", checkpoint, rank
            )
            return
        # Each rank reads its own generators: no collective needed.
        restore_rng(load_state_dict(checkpoint, keys=[key], process_group=SINGLE_RANK)["rng"][rank])


class AsyncCheckpointTrainer(AsyncCheckpointMixin, Trainer):
    """``transformers.Trainer`` whose checkpoints async_ckpt saves in the background."""


def _saved_roots(checkpoint: str) -> set[str]:
    md = read_metadata(checkpoint)
    return {k.split(".", 1)[0] for k in (*md.tensors, *md.values)}


def _ensure_trainer_state_file(checkpoint: str) -> None:
    # A crash between the commit and the trainer_state.json write leaves a committed checkpoint without
    # it; Trainer.train reads the file, so rebuild it from the copy inside the checkpoint.
    path = Path(checkpoint) / TRAINER_STATE_NAME
    if path.is_file():
        return
    saved = load_state_dict(checkpoint, keys=["trainer_state"], process_group=SINGLE_RANK)["trainer_state"]
    _write_atomically(path, saved)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
