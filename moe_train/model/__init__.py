"""Single-device model math. Nothing here imports torch.distributed (tests/unit/test_layout.py checks)."""

from moe_train.model.moe import MoE, Routing, TopKRouter
from moe_train.model.transformer import ModelOutput, ModelSize, Transformer, lm_loss, model_size

__all__ = ["MoE", "ModelOutput", "ModelSize", "Routing", "TopKRouter", "Transformer", "lm_loss", "model_size"]
