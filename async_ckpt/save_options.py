"""What a save call asks for beyond the state dict and the id.

Small and picklable: the options travel with every save request to the
worker, and a worker's plan cache is keyed on them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SaveOptions"]


@dataclass(frozen=True, slots=True)
class SaveOptions:
    """The options of ``save``, ``async_save`` and ``AsyncCheckpointer`` of the same names.

    Only settings a public call can set belong here; fixed choices of the
    save (checksum block size, files per rank, dedup policy) are constants of
    ``save_flow.py``.
    """

    allow_pickle: bool = False
    verify_replicas: bool = False
