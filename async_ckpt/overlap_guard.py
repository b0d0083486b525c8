"""Optimizer step guards for overlap saves: a step waits until the save's staging copy is done.

An overlap save copies the state on a helper thread while training goes on;
``optimizer.step()`` changes parameters and optimizer state in place, so a
step before the copy is done would leave a checkpoint that mixes pre- and
post-step values. Forward and backward only read parameters (they write
gradients, which are not saved), so guarding the step guards the model too.

Each guarded optimizer gets one ``_StepGuard`` at a time, holding the staging
handles of every save in flight that it must wait for. Its step pre-hook waits
for them (a failed staging just stops the wait: the error reaches that save's
``PendingCheckpoint``), then retires the guard. Hooks come off on the thread
that steps, never on the staging thread, which might delete one while the
step iterates the hooks dict ("mutated during iteration"). The pre-hook
cannot delete itself either while torch iterates that dict, so it registers a
one-off post-hook, which removes the pre-hook and then itself (deleting the
last entry of the dict being iterated is safe; a post-hook registered after it
by someone else leaves it in place for the next step instead).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ._tree import MAX_DEPTH, is_stateful
from .pending import StagedHandle

__all__ = ["GuardArg", "check_guard", "guard_step", "optimizers_to_guard"]

GuardArg = bool | Iterable[torch.optim.Optimizer]
"""``True``: the optimizers found in the state dict; ``False``: none; an iterable: those as well."""

_MAX_ATTR_ITEMS = 64
"""A wrapper's list or dict attribute longer than this is data, not a set of optimizers: not searched."""

_lock = threading.Lock()
_guards: weakref.WeakKeyDictionary[torch.optim.Optimizer, _StepGuard] = weakref.WeakKeyDictionary()


def check_guard(guard: GuardArg) -> list[torch.optim.Optimizer]:
    """The optimizers ``guard`` names (none for True or False); TypeError for a bad ``guard``."""
    if guard is True or guard is False:
        return []
    if isinstance(guard, (torch.optim.Optimizer, str, bytes)) or not isinstance(guard, Iterable):
        raise TypeError(f"guard must be True, False or a list of optimizers, got {type(guard).__qualname__}")
    explicit = list(guard)
    for opt in explicit:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"guard must hold torch.optim.Optimizer objects, got {type(opt).__qualname__}")
    return explicit


def optimizers_to_guard(
    statefuls: Iterable[tuple[Any, int]], guard: GuardArg, explicit: list[torch.optim.Optimizer]
) -> list[torch.optim.Optimizer]:
    """The optimizers an overlap save holds back: ``explicit`` (from ``check_guard``) and, unless
    ``guard`` is False, those found from ``statefuls`` (``Flat.statefuls`` of the state dict)."""
    if guard is False:
        return []
    found = {id(o): o for o in _find_optimizers(statefuls)}
    for opt in explicit:
        found.setdefault(id(opt), opt)
    return list(found.values())


def guard_step(optimizers: Iterable[torch.optim.Optimizer], staged: StagedHandle) -> None:
    """Make each optimizer's next ``step()`` wait for ``staged`` (call on the thread that steps)."""
    with _lock:
        for opt in optimizers:
            g = _guards.get(opt)
            if g is None or g.retired:
                g = _guards[opt] = _StepGuard(opt)
            g.waiting.append(staged)


class _StepGuard:
    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.waiting: list[StagedHandle] = []
        self.retired = False
        self._pre = opt.register_step_pre_hook(self._before_step)
        self._post: RemovableHandle | None = None

    def _before_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        while True:
            with _lock:
                waiting = [s for s in self.waiting if not s.done()]
                if not waiting:
                    self.waiting.clear()
                    self.retired = True
                    if _guards.get(opt) is self:
                        del _guards[opt]
                    break
            for staged in waiting:
                try:
                    staged.wait()
                except Exception:  # noqa: BLE001 - the save's own PendingCheckpoint reports it
                    pass
        if self._post is None:
            self._post = opt.register_step_post_hook(self._after_step)

    def _after_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._pre.remove()
        post = self._post
        hooks = post.hooks_dict_ref() if post is not None else None
        if post is not None and hooks is not None and next(reversed(hooks), None) == post.id:
            post.remove()


def _find_optimizers(statefuls: Iterable[tuple[Any, int]]) -> list[torch.optim.Optimizer]:
    """Optimizers in the containers of a state dict, and held by the ``Stateful`` wrappers in it.

    Flattening walks every container and hands over the ``Stateful`` objects it
    met there (an optimizer is one), with their depth, so the containers are not
    walked a second time (0.5-1 ms for 2,872 tensors). A wrapper's state is not
    asked for (its ``state_dict()`` may be costly or collective): its attributes
    are looked at instead, as DCP's ``AppState`` recipe holds ``self.optimizer``
    and torchtitan's container is an ``Optimizer`` holding a list of them.
    Modules hold no optimizer: skipped.
    """
    found: dict[int, torch.optim.Optimizer] = {}
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = list(statefuls)
    stack.reverse()  # the first met is looked at first
    while stack:
        node, depth = stack.pop()
        if id(node) in seen or depth > MAX_DEPTH:
            continue
        seen.add(id(node))
        if isinstance(node, torch.optim.Optimizer):
            found.setdefault(id(node), node)
            continue
        if isinstance(node, dict):
            kids: Any = node.values()
        elif isinstance(node, (list, tuple)):
            kids = node
        elif is_stateful(node) and not isinstance(node, nn.Module) and depth < 8:
            attrs = getattr(node, "__dict__", None)
            if isinstance(attrs, dict):
                stack.extend((v, depth + 1) for v in attrs.values() if type(v) not in _LEAVES)
            continue
        else:
            continue
        if len(kids) <= _MAX_ATTR_ITEMS:  # longer: data, not a set of optimizers
            stack.extend((v, depth + 1) for v in kids if type(v) not in _LEAVES)
    return list(found.values())


_LEAVES = frozenset({torch.Tensor, nn.Parameter, int, float, bool, str, bytes, type(None)})
