"""Pure save/load planning: who writes what, and is it complete.

Nothing here does I/O or talks to other ranks; the coordinator gathers local
plans, calls :func:`create_global_plan`, and scatters the result.
"""

from .dedup import (
    DEFAULT_ITEM_COST_BYTES,
    balanced_dedup,
    dedup_save_plans,
    dedup_tensors,
)
from .global_plan import DedupMode, GlobalPlan, create_global_plan
from .reshard import (
    ChunkIndex,
    Overlap,
    chunk_overlap,
    contiguous_byte_range,
    find_overlaps,
)
from .types import (
    ChunkStorageMetadata,
    MetadataIndex,
    SavePlan,
    TensorProperties,
    TensorWriteData,
    WriteItem,
    WriteItemType,
    tensor_properties,
    write_item_for_tensor,
)
from .validate import PlanValidationError, validate_coverage

__all__ = [
    "DEFAULT_ITEM_COST_BYTES",
    "ChunkIndex",
    "ChunkStorageMetadata",
    "DedupMode",
    "GlobalPlan",
    "MetadataIndex",
    "Overlap",
    "PlanValidationError",
    "SavePlan",
    "TensorProperties",
    "TensorWriteData",
    "WriteItem",
    "WriteItemType",
    "balanced_dedup",
    "chunk_overlap",
    "contiguous_byte_range",
    "create_global_plan",
    "dedup_save_plans",
    "dedup_tensors",
    "find_overlaps",
    "tensor_properties",
    "validate_coverage",
    "write_item_for_tensor",
]
