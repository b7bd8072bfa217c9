"""Options of the distributed-checkpoint targets, apart from pyconv.mcore.dcp so that format
detection (which imports every adapter, NeMo's among them) does not import the DCP machinery."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DcpOptions:
    """The options of a distributed-checkpoint target (torch_dist, NeMo 2's weights/)."""

    megatron_naming: str = "te"           # "te" (TransformerEngine fused norms) or "local"
    max_shard_size: int = 5_000_000_000   # bytes per .distcp file
