"""Every other MoE model with grouped-query attention as Qwen2-MoE: shared experts, unrenormalised
top-k, dense layers anywhere (its mlp_only_layers); `norm_topk_prob` is our `renormalize`."""

from __future__ import annotations

from moe_train.config import ConfigError, ModelConfig, MoEConfig
from moe_train.tools.hf.adapter import Adapter, Layout, empty_mlp
from moe_train.tools.hf.mixtral import check_softmax_routing


class Qwen2Moe(Adapter):
    """Qwen2-MoE multiplies its shared expert by sigmoid(shared_expert_gate(x)). With that gate's
    weight at zero the factor is exactly 0.5, and the shared down projection is stored doubled (a
    power of two: exact in any float format), so it computes our ungated sum exactly; a checkpoint
    whose gates are not zero is refused on import."""

    model_type = "qwen2_moe"

    def claims(self, config: ModelConfig) -> bool:
        # tried after Mixtral: every grouped-query MoE model Mixtral does not take
        return not config.mla.enabled and config.moe.num_experts > 0

    def check_expressible(self, config: ModelConfig) -> None:
        check_softmax_routing(config)

    def moe_layout(self, layout: Layout, config: ModelConfig, ours: str, theirs: str) -> None:
        super().moe_layout(layout, config, ours, theirs)
        moe = theirs + self.moe_prefix
        layout.zero.append((moe + "shared_expert_gate.weight", (1, config.dim)))
        if config.moe.num_shared_experts * config.expert_hidden_dim:
            layout.plain += [
                (ours + "ffn.shared_experts.w1.weight", moe + "shared_expert.gate_proj.weight"),
                (ours + "ffn.shared_experts.w3.weight", moe + "shared_expert.up_proj.weight"),
            ]
            layout.doubled.append(
                (ours + "ffn.shared_experts.w2.weight", moe + "shared_expert.down_proj.weight")
            )
        else:  # Qwen2-MoE always has a shared expert
            layout.zero += empty_mlp(moe + "shared_expert.", config.dim)

    def hf_config(self, config: ModelConfig, common: dict):
        from transformers import Qwen2MoeConfig

        moe = config.moe
        return Qwen2MoeConfig(
            intermediate_size=config.ffn_hidden_dim,  # the dense layers'
            moe_intermediate_size=config.expert_hidden_dim,
            shared_expert_intermediate_size=moe.num_shared_experts * config.expert_hidden_dim,
            num_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            norm_topk_prob=moe.renormalize,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i in range(config.num_layers) if not config.is_moe_layer(i)],
            router_aux_loss_coef=moe.aux_loss_coef,
            qkv_bias=False,
            use_sliding_window=False,
            **common,
        )

    def from_hf(self, hf: dict) -> dict:
        expert, shared = hf["moe_intermediate_size"], hf.get("shared_expert_intermediate_size", 0)
        if shared % expert:
            raise ConfigError(
                f"shared_expert_intermediate_size {shared} is not a multiple of the expert size {expert}"
            )
        step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
        pattern = [i not in dense and (i + 1) % step == 0 for i in range(hf["num_hidden_layers"])]
        first, every = _moe_placement(pattern)
        moe = MoEConfig(
            num_experts=hf["num_experts"],
            top_k=hf["num_experts_per_tok"],
            num_shared_experts=shared // expert,
            expert_hidden_dim=expert,
            first_k_dense=first,
            every_n_layers=every,
            renormalize=bool(hf.get("norm_topk_prob", False)),
            aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        )
        return {"moe": moe}


def _moe_placement(pattern: list[bool]) -> tuple[int, int]:
    """(first_k_dense, every_n_layers) whose rule reproduces `pattern`, or a ConfigError."""
    n_layers = len(pattern)
    for first in range(n_layers):
        for every in range(1, n_layers + 1):
            if [i >= first and i % every == 0 for i in range(n_layers)] == pattern:
                return first, every
    raise ConfigError(f"the MoE layer pattern {pattern} is not first-k-dense / every-n-th; not supported")
