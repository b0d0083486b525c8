"""Reading other libraries' checkpoints: torch.distributed.checkpoint (DCP) directories.

Nothing here unpickles anything from the file unless the caller passes
``allow_pickle=True``: DCP's ``.metadata`` goes through an allow-list
unpickler, tensor chunks are located or decoded with ``weights_only``
loading. See docs/migration-from-dcp.md.
"""

from .dcp_detect import DcpCheckpointError, dcp_unsupported, is_dcp_checkpoint
from .dcp_load import load_dcp, read_dcp_metadata

__all__ = ["DcpCheckpointError", "dcp_unsupported", "is_dcp_checkpoint", "load_dcp", "read_dcp_metadata"]
