"""Every save option is one a caller can set: no setting that no public call reaches."""

from __future__ import annotations

import dataclasses
import inspect

import async_ckpt as ac
from async_ckpt.save_options import SaveOptions


def test_every_save_option_is_a_parameter_of_the_public_save_calls() -> None:
    # The two calls that build SaveOptions (``async_save`` saves with a checkpointer's defaults).
    fields = {f.name for f in dataclasses.fields(SaveOptions)}
    for call in (ac.save, ac.AsyncCheckpointer):
        params = set(inspect.signature(call).parameters)
        assert fields <= params, f"{call.__qualname__} cannot set {sorted(fields - params)}"


def test_save_options_travel_to_the_worker_and_key_its_plan_cache() -> None:
    # Sent with every request and used as a dict key by the worker's plan cache.
    import pickle

    options = SaveOptions(allow_pickle=True, verify_replicas=True)
    assert pickle.loads(pickle.dumps(options)) == options
    assert {options: 1}[SaveOptions(allow_pickle=True, verify_replicas=True)] == 1
