"""What a save call asks for beyond the state dict and the id.

Small and picklable: the options travel with every save request to the
worker, and a worker's plan cache is keyed on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .format import checksum

__all__ = ["SaveOptions"]


@dataclass(frozen=True, slots=True)
class SaveOptions:
    allow_pickle: bool = False
    verify_replicas: bool = False
    block_size: int = checksum.DEFAULT_BLOCK_SIZE
    max_files_per_rank: int = 4
    dedup: str = "balanced"
