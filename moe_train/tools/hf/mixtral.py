"""MoE models as Mixtral: grouped-query attention, an MoE in every layer, top-k renormalised,
no shared experts. Its routing check is Qwen2-MoE's too."""

from __future__ import annotations

from moe_train.config import ModelConfig, MoEConfig
from moe_train.tools.hf.adapter import Adapter, refuse_unsupported


class Mixtral(Adapter):
    model_type = "mixtral"
    moe_prefix = "block_sparse_moe."
    expert_names = {"w1": "w1", "w3": "w3", "w2": "w2"}

    def claims(self, config: ModelConfig) -> bool:
        moe = config.moe
        return (
            not config.mla.enabled
            and moe.num_experts > 0
            and moe.renormalize
            and not moe.num_shared_experts
            and all(config.is_moe_layer(i) for i in range(config.num_layers))
        )

    def check_expressible(self, config: ModelConfig) -> None:
        check_softmax_routing(config)

    def hf_config(self, config: ModelConfig, common: dict):
        from transformers import MixtralConfig

        moe = config.moe
        return MixtralConfig(
            intermediate_size=config.expert_hidden_dim,
            head_dim=config.head_dim,
            num_local_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            router_aux_loss_coef=moe.aux_loss_coef,
            sliding_window=None,
            **common,
        )

    def from_hf(self, hf: dict) -> dict:
        moe = MoEConfig(
            num_experts=hf["num_local_experts"],
            top_k=hf["num_experts_per_tok"],
            renormalize=True,
            aux_loss_coef=hf.get("router_aux_loss_coef", 0.01),
        )
        return {"moe": moe}


def check_softmax_routing(config: ModelConfig) -> None:
    """Mixtral and Qwen2-MoE route with a softmax over all the experts, unscaled, without groups."""
    moe = config.moe
    why = (
        "Mixtral and Qwen2-MoE route with a softmax over all the experts, unscaled "
        "(with model.mla: DeepSeek-V2/V3)"
    )
    refuse_unsupported(
        {
            f"model.moe.score_function={moe.score_function}": (moe.score_function != "softmax", why),
            f"model.moe.topk_groups={moe.topk_groups}": (moe.topk_groups != 0, why),
            f"model.moe.routed_scaling_factor={moe.routed_scaling_factor}": (
                moe.routed_scaling_factor != 1.0,
                why,
            ),
        }
    )
