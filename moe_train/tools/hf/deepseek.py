"""Models with multi-head latent attention (model.mla) as DeepSeek-V3 (sigmoid routing) or
DeepSeek-V2 (softmax routing), with V3's multi-token prediction modules where it keeps them."""

from __future__ import annotations

import logging

import torch

from moe_train.config import ConfigError, MLAConfig, ModelConfig, MoEConfig, MTPConfig
from moe_train.tools.hf.adapter import MLP_NAMES, Adapter, Layout, empty_mlp, refuse_unsupported

log = logging.getLogger(__name__)

_MLA = [  # the rotary rows of wq / wq_b and wkv_a are permuted (Layout.interleaved)
    ("attention.q_norm.weight", "self_attn.q_a_layernorm.weight"),
    ("attention.wq_a.weight", "self_attn.q_a_proj.weight"),
    ("attention.kv_norm.weight", "self_attn.kv_a_layernorm.weight"),
    ("attention.wkv_b.weight", "self_attn.kv_b_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
]
_MTP = [  # a multi-token prediction depth's own weights (DeepSeek-V3's names)
    ("enorm.weight", "enorm.weight"),
    ("hnorm.weight", "hnorm.weight"),
    ("eh_proj.weight", "eh_proj.weight"),
    ("norm.weight", "shared_head.norm.weight"),
]


class DeepSeek(Adapter):
    """DeepSeek-V3 renormalises, scales, and has our routing bias; it ranks expert groups by their
    top 2 scores, so group-limited routing needs top_k = 2 x topk_groups. DeepSeek-V2 never
    renormalises and ranks groups by their best score (top_k = topk_groups). Both have their
    dense layers first and an MoE in every layer after.

    Their checkpoints lay each rotary part out in interleaved pairs (x0, x1), (x2, x3)... where
    ours is rotate-half (x0, x_d/2)...: the rotary rows of the query and of the shared key are
    permuted on the way out and back (the attention scores do not change)."""

    latent_attention = True

    def __init__(self, model_type: str):
        self.model_type = model_type
        self.v3 = model_type == "deepseek_v3"
        self.routing_bias = self.v3
        self.per_group = 2 if self.v3 else 1  # the scores that rank an expert group

    def claims(self, config: ModelConfig) -> bool:
        return config.mla.enabled and (config.moe.score_function == "sigmoid") == self.v3

    def check_expressible(self, config: ModelConfig) -> None:
        moe, arch, per_group = config.moe, self.model_type, self.per_group
        dense_first = all(
            config.is_moe_layer(i) == (i >= moe.first_k_dense) for i in range(config.num_layers)
        )
        refuse_unsupported(
            {
                f"model.moe.every_n_layers={moe.every_n_layers}": (
                    not dense_first,
                    "DeepSeek-V2/V3 have an MoE in every layer after the first dense ones",
                ),
                f"model.moe.topk_groups={moe.topk_groups} with model.moe.top_k={moe.top_k}": (
                    bool(moe.topk_groups) and moe.top_k != per_group * moe.topk_groups,
                    f"{arch} ranks groups by their best {per_group} score(s): top_k must be "
                    f"{per_group} x topk_groups",
                ),
                "model.moe.renormalize=true": (
                    not self.v3 and moe.renormalize,
                    "DeepSeek-V2 (softmax routing) never renormalises; DeepSeek-V3 takes sigmoid scores",
                ),
            }
        )

    def layout(self, config: ModelConfig) -> Layout:
        layout = super().layout(config)
        if not self.v3:
            return layout
        # the multi-token prediction modules follow the layers, each with its own copy of the
        # embedding and of the output head (which we share: written out, not read back)
        for k in range(config.mtp.num_layers):
            ours, theirs = f"mtp.{k}.", f"model.layers.{config.num_layers + k}."
            self.block_layout(layout, config, config.num_layers + k, ours + "block.", theirs)
            layout.plain += [(ours + a, theirs + b) for a, b in _MTP]
            layout.copies += [
                ("tok_embeddings.weight", theirs + "embed_tokens.weight"),
                ("output.weight", theirs + "shared_head.head.weight"),
            ]
        return layout

    def attention_layout(self, layout: Layout, config: ModelConfig, ours: str, theirs: str) -> None:
        mla, H = config.mla, config.num_heads
        qk_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        query = ("wq_b", "q_b_proj") if mla.q_lora_rank else ("wq", "q_proj")
        head_rope_starts = range(mla.qk_nope_head_dim, H * qk_dim, qk_dim)
        layout.plain += [(ours + a, theirs + b) for a, b in _MLA if mla.q_lora_rank or "q_" not in b]
        layout.interleaved += [
            (
                ours + f"attention.{query[0]}.weight",
                theirs + f"self_attn.{query[1]}.weight",
                _interleaved_rows(H * qk_dim, head_rope_starts, mla.qk_rope_head_dim),
            ),
            (
                ours + "attention.wkv_a.weight",
                theirs + "self_attn.kv_a_proj_with_mqa.weight",
                _interleaved_rows(
                    mla.kv_lora_rank + mla.qk_rope_head_dim,
                    range(mla.kv_lora_rank, mla.kv_lora_rank + 1),
                    mla.qk_rope_head_dim,
                ),
            ),
        ]

    def moe_layout(self, layout: Layout, config: ModelConfig, ours: str, theirs: str) -> None:
        super().moe_layout(layout, config, ours, theirs)
        moe = theirs + self.moe_prefix
        if config.moe.num_shared_experts * config.expert_hidden_dim:
            layout.plain += [
                (ours + f"ffn.shared_experts.{a}.weight", moe + f"shared_experts.{b}.weight")
                for a, b in MLP_NAMES.items()
            ]
        else:
            layout.zero += empty_mlp(moe + "shared_experts.", config.dim)
        bias = moe + "gate.e_score_correction_bias"  # DeepSeek-V3's routing bias
        if self.v3 and config.moe.bias_update_rate > 0:
            layout.plain.append((ours + "ffn.router.expert_bias", bias))
        elif self.v3:
            layout.zero.append((bias, (config.moe.num_experts,)))

    def hf_config(self, config: ModelConfig, common: dict):
        from transformers import DeepseekV2Config, DeepseekV3Config

        moe, mla = config.moe, config.mla
        routed = moe.num_experts > 0
        limited = routed and moe.topk_groups
        groups = dict(n_group=moe.num_expert_groups, topk_group=moe.topk_groups) if limited else {}
        common = dict(
            common,
            num_key_value_heads=config.num_heads,
            intermediate_size=config.ffn_hidden_dim,  # the dense layers'
            kv_lora_rank=mla.kv_lora_rank,
            q_lora_rank=mla.q_lora_rank or None,
            qk_nope_head_dim=mla.qk_nope_head_dim,
            qk_rope_head_dim=mla.qk_rope_head_dim,
            v_head_dim=mla.v_head_dim,
            moe_intermediate_size=config.expert_hidden_dim,
            n_routed_experts=moe.num_experts,
            n_shared_experts=moe.num_shared_experts,
            num_experts_per_tok=moe.top_k if routed else None,
            first_k_dense_replace=moe.first_k_dense if routed else config.num_layers,
            routed_scaling_factor=moe.routed_scaling_factor,
            attention_bias=False,
        )
        if self.v3:
            return DeepseekV3Config(
                norm_topk_prob=moe.renormalize,
                rope_interleave=True,
                num_nextn_predict_layers=config.mtp.num_layers,
                **(groups or dict(n_group=1, topk_group=1)),
                **common,
            )
        topk_method = "group_limited_greedy" if groups else "greedy"
        return DeepseekV2Config(topk_method=topk_method, norm_topk_prob=False, **groups, **common)

    def from_hf(self, hf: dict) -> dict:
        v3 = self.v3
        if v3 and not hf.get("rope_interleave", True):
            raise ConfigError("rope_interleave=false is not supported (DeepSeek's checkpoints interleave)")
        mla = MLAConfig(
            kv_lora_rank=hf["kv_lora_rank"],
            q_lora_rank=hf.get("q_lora_rank") or 0,
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
        )
        if not hf.get("n_routed_experts") or hf.get("first_k_dense_replace", 0) >= hf["num_hidden_layers"]:
            # dense (how a dense model with MLA exports): no routing to read; the score function
            # keeps the architecture, so that it exports back to this one
            moe = MoEConfig(num_experts=0, score_function="sigmoid" if v3 else "softmax")
        else:
            moe = self._routing(hf)
        if not v3:
            return {"moe": moe, "mla": mla}
        # V3 weighed its MTP loss 0.3, then 0.1 for its last 4.8T tokens
        mtp = MTPConfig(num_layers=hf.get("num_nextn_predict_layers") or 0, loss_coef=0.1)
        return {"moe": moe, "mla": mla, "mtp": mtp}

    def _routing(self, hf: dict) -> MoEConfig:
        """The MoE settings of a config.json with routed experts."""
        model_type, v3 = self.model_type, self.v3
        if not v3 and hf.get("norm_topk_prob"):
            log.warning(
                "norm_topk_prob=true in config.json is not applied: transformers' DeepSeek-V2 does not "
                "renormalise the top-k weights (DeepSeek's own code does); imported with "
                "model.moe.renormalize=false, as transformers computes it"
            )
        k, groups, limit = hf["num_experts_per_tok"], hf.get("n_group") or 1, hf.get("topk_group") or 1
        limited = limit < groups and (v3 or hf.get("topk_method", "greedy") == "group_limited_greedy")
        if limited and k != self.per_group * limit:
            raise ConfigError(
                f"{model_type} ranks groups by their best {self.per_group} score(s), ours by the best "
                f"top_k / topk_groups: num_experts_per_tok={k} with topk_group={limit} is not expressible"
            )
        if not v3 and hf.get("topk_method", "greedy") not in ("greedy", "group_limited_greedy"):
            raise ConfigError(
                f"topk_method {hf['topk_method']!r} is not supported (greedy or group_limited_greedy)"
            )
        return MoEConfig(
            num_experts=hf["n_routed_experts"],
            top_k=k,
            num_shared_experts=hf.get("n_shared_experts") or 0,
            expert_hidden_dim=hf["moe_intermediate_size"],
            first_k_dense=hf.get("first_k_dense_replace", 0),
            score_function="sigmoid" if v3 else "softmax",
            renormalize=bool(hf.get("norm_topk_prob")) if v3 else False,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            num_expert_groups=groups if limited else 1,
            topk_groups=limit if limited else 0,
            # V3's training-time settings; its routing bias is part of the model
            bias_update_rate=0.001 if v3 else 0.0,
            aux_loss_scope="sequence" if v3 else "batch",
            aux_loss_coef=0.0001 if v3 else 0.001,
            z_loss_coef=0.0,
        )


def _interleaved_rows(num_rows: int, starts: range, rope_dim: int) -> torch.Tensor:
    """A row order that lays each rotary block [start, start + rope_dim) out as interleaved pairs
    (row start + i, row start + rope_dim / 2 + i) instead of rotate-half halves."""
    rows = torch.arange(num_rows)
    half = torch.arange(rope_dim // 2)
    pairs = torch.stack([half, half + rope_dim // 2], dim=-1).flatten()  # 0, d/2, 1, d/2 + 1, ...
    for start in starts:
        rows[start : start + rope_dim] = start + pairs
    return rows
