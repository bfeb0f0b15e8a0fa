"""Dense models as Llama (grouped-query attention, SwiGLU, rotate-half rotary layout: our weights
copy as they are). Mistral imports the same way: its sliding window is a shorter context."""

from __future__ import annotations

from moe_train.config import ModelConfig
from moe_train.tools.hf.adapter import Adapter


class Llama(Adapter):
    model_type = "llama"
    aliases = ("mistral",)

    def claims(self, config: ModelConfig) -> bool:
        return not config.mla.enabled and config.moe.num_experts == 0

    def hf_config(self, config: ModelConfig, common: dict):
        from transformers import LlamaConfig

        return LlamaConfig(
            intermediate_size=config.ffn_hidden_dim,
            head_dim=config.head_dim,
            attention_bias=False,
            mlp_bias=False,
            **common,
        )
