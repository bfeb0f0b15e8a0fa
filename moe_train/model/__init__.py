"""Single-device model math. Nothing here imports torch.distributed (tests/unit/test_layout.py checks)."""

from moe_train.model.documents import DocumentPacking, Documents
from moe_train.model.moe import MoE, Routing, TopKRouter
from moe_train.model.transformer import (
    ModelOutput,
    ModelSize,
    Transformer,
    lm_loss,
    model_size,
    moe_block_ids,
)

__all__ = [
    "DocumentPacking",
    "Documents",
    "MoE",
    "ModelOutput",
    "ModelSize",
    "Routing",
    "TopKRouter",
    "Transformer",
    "lm_loss",
    "model_size",
    "moe_block_ids",
]
