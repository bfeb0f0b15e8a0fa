"""Our models in Hugging Face `transformers` layouts, both ways.

With grouped-query attention:
- dense models: Llama;
- MoE models with top-k renormalisation, an MoE in every layer and no shared experts: Mixtral;
- every other MoE model (shared experts, unrenormalised top-k, first-k-dense or every-n-th layers):
  Qwen2-MoE. Its shared expert is multiplied by sigmoid(shared_expert_gate(x)); with that gate's
  weight at zero the factor is exactly 0.5, and the shared down projection is stored doubled (a
  power of two: exact in any float format), so it computes our ungated sum exactly. Its
  `mlp_only_layers` list places dense layers anywhere, and `norm_topk_prob` is our `renormalize`.
  No other architecture in transformers 5 matches: Qwen3-MoE/OLMoE/dots1 have qk-norm,
  Ernie-4.5-MoE always renormalises and interleaves its rotary layout, GraniteMoeShared has no
  dense layers. All three route with a softmax over the experts, unscaled, without groups.
With multi-head latent attention (model.mla):
- sigmoid routing: DeepSeek-V3 (renormalisation, scaling, the routing bias; groups ranked by their
  top 2 scores, so group-limited routing needs top_k = 2 x topk_groups);
- softmax routing: DeepSeek-V2 (never renormalised; groups ranked by their best score, so
  top_k = topk_groups). Both have their dense layers first and an MoE in every layer after.
  DeepSeek's checkpoints lay each rotary part out in interleaved pairs (x0, x1), (x2, x3)...
  where ours is rotate-half (x0, x_d/2)...: the rotary rows of the query and of the shared key
  are permuted on the way out and back (the attention scores do not change).
  Multi-token prediction modules (model.mtp) go where DeepSeek-V3's checkpoint has its own: the
  layers after the last, each with copies of the embedding and output head (transformers skips
  them; vLLM and SGLang use them to draft tokens). No other architecture has a place for them.
Importing a Qwen2-MoE checkpoint back requires its shared-expert gates to be still zero.

Keys on disk are the Hub's usual per-expert ones, which transformers 5 also writes with
save_pretrained and fuses on load. Our linear layers and rotary layout (rotate-half) are HF's, so
weights copy without permutation; the stacked expert weights (E, in, out), used as x @ w, become
per-expert nn.Linear weights (out, in).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_train.config import ConfigError, MLAConfig, ModelConfig, MoEConfig, MTPConfig, RopeScalingConfig

# per layer: (our name, HF name)
_NORMS = [
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
]
_ATTENTION = [
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
]
_MLA = [  # the rotary rows of wq / wq_b and wkv_a are permuted (_Layout.interleaved)
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
_DENSE_FFN = [
    ("ffn.w1.weight", "mlp.gate_proj.weight"),
    ("ffn.w3.weight", "mlp.up_proj.weight"),
    ("ffn.w2.weight", "mlp.down_proj.weight"),
]
# stacked expert weights -> per-expert names: Mixtral's and Qwen2-MoE's
_EXPERT_NAMES = {
    "mixtral": ("block_sparse_moe.", {"w1": "w1", "w3": "w3", "w2": "w2"}),
    "qwen2_moe": ("mlp.", {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}),
    "deepseek_v2": ("mlp.", {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}),
    "deepseek_v3": ("mlp.", {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}),
}
_DEEPSEEK = ("deepseek_v2", "deepseek_v3")


def architecture(config: ModelConfig) -> str:
    """The transformers architecture (model_type) for `config`; `check_expressible` says whether
    it computes `config` exactly."""
    moe = config.moe
    if config.mla.enabled:
        return "deepseek_v3" if moe.score_function == "sigmoid" else "deepseek_v2"
    if moe.num_experts == 0:
        return "llama"
    mixtral_like = (
        moe.renormalize
        and not moe.num_shared_experts
        and all(config.is_moe_layer(i) for i in range(config.num_layers))
    )
    return "mixtral" if mixtral_like else "qwen2_moe"


@dataclass
class _Layout:
    plain: list[tuple[str, str]] = field(default_factory=list)  # copied as is
    # stacked (E, in, parts * out) <-> per expert (out, in), for each part: w13 is [gate | up]
    experts: list[tuple[str, list[list[str]]]] = field(default_factory=list)
    doubled: list[tuple[str, str]] = field(default_factory=list)  # Qwen2-MoE shared down projection
    zero: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # HF-only tensors fixed at 0
    # MLA rows in DeepSeek's order: theirs = ours[rows], ours = theirs[rows.argsort()]
    interleaved: list[tuple[str, str, torch.Tensor]] = field(default_factory=list)
    copies: list[tuple[str, str]] = field(default_factory=list)  # written out again, not read back


def _interleaved_rows(num_rows: int, starts: range, rope_dim: int) -> torch.Tensor:
    """A row order that lays each rotary block [start, start + rope_dim) out as interleaved pairs
    (row start + i, row start + rope_dim / 2 + i) instead of rotate-half halves."""
    rows = torch.arange(num_rows)
    half = torch.arange(rope_dim // 2)
    pairs = torch.stack([half, half + rope_dim // 2], dim=-1).flatten()  # 0, d/2, 1, d/2 + 1, ...
    for start in starts:
        rows[start : start + rope_dim] = start + pairs
    return rows


def _mla_layout(config: ModelConfig, ours: str, theirs: str) -> _Layout:
    mla, H = config.mla, config.num_heads
    qk_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    query = ("wq_b", "q_b_proj") if mla.q_lora_rank else ("wq", "q_proj")
    head_rope_starts = range(mla.qk_nope_head_dim, H * qk_dim, qk_dim)
    return _Layout(
        plain=[(ours + a, theirs + b) for a, b in _MLA if mla.q_lora_rank or "q_" not in b],
        interleaved=[
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
        ],
    )


def _layout(config: ModelConfig, arch: str) -> _Layout:
    layout = _Layout(
        plain=[("tok_embeddings.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    )
    if not config.tie_embeddings:
        layout.plain.append(("output.weight", "lm_head.weight"))
    for i in range(config.num_layers):
        _block_layout(layout, config, arch, i, f"layers.{i}.", f"model.layers.{i}.")
    if arch != "deepseek_v3":
        return layout
    # DeepSeek-V3's multi-token prediction modules follow the layers, each with its own copy of the
    # embedding and of the output head (which we share: written out, not read back)
    for k in range(config.mtp.num_layers):
        ours, theirs = f"mtp.{k}.", f"model.layers.{config.num_layers + k}."
        _block_layout(layout, config, arch, config.num_layers + k, ours + "block.", theirs)
        layout.plain += [(ours + a, theirs + b) for a, b in _MTP]
        layout.copies += [
            ("tok_embeddings.weight", theirs + "embed_tokens.weight"),
            ("output.weight", theirs + "shared_head.head.weight"),
        ]
    return layout


def _block_layout(layout: _Layout, config: ModelConfig, arch: str, i: int, ours: str, theirs: str) -> None:
    """Add transformer block `i` (our keys under `ours`, theirs under `theirs`) to `layout`."""
    layout.plain += [(ours + a, theirs + b) for a, b in _NORMS]
    if config.mla.enabled:
        mla = _mla_layout(config, ours, theirs)
        layout.plain += mla.plain
        layout.interleaved += mla.interleaved
    else:
        layout.plain += [(ours + a, theirs + b) for a, b in _ATTENTION]
    if not config.is_moe_layer(i):
        layout.plain += [(ours + a, theirs + b) for a, b in _DENSE_FFN]
        return
    prefix, names = _EXPERT_NAMES[arch]
    moe = theirs + prefix
    layout.plain.append((ours + "ffn.router.gate.weight", moe + "gate.weight"))
    for stacked, parts in (("w13", ("w1", "w3")), ("w2", ("w2",))):
        keys = [
            [moe + f"experts.{e}.{names[part]}.weight" for e in range(config.moe.num_experts)]
            for part in parts
        ]
        layout.experts.append((ours + f"ffn.experts.{stacked}", keys))
    shared_hidden = config.moe.num_shared_experts * config.expert_hidden_dim
    if arch in _DEEPSEEK:
        shared = [
            (ours + f"ffn.shared_experts.{a}.weight", moe + f"shared_experts.{b}.weight")
            for a, b in names.items()
        ]
        if shared_hidden:
            layout.plain += shared
        else:  # no shared experts: a width-0 shared MLP adds exactly nothing
            layout.zero += [(b, (config.dim, 0) if "down" in b else (0, config.dim)) for _, b in shared]
        bias = moe + "gate.e_score_correction_bias"  # DeepSeek-V3's routing bias
        if arch == "deepseek_v3" and config.moe.bias_update_rate > 0:
            layout.plain.append((ours + "ffn.router.expert_bias", bias))
        elif arch == "deepseek_v3":
            layout.zero.append((bias, (config.moe.num_experts,)))
        return
    if arch != "qwen2_moe":
        return
    layout.zero.append((moe + "shared_expert_gate.weight", (1, config.dim)))
    if shared_hidden:
        layout.plain += [
            (ours + "ffn.shared_experts.w1.weight", moe + "shared_expert.gate_proj.weight"),
            (ours + "ffn.shared_experts.w3.weight", moe + "shared_expert.up_proj.weight"),
        ]
        layout.doubled.append((ours + "ffn.shared_experts.w2.weight", moe + "shared_expert.down_proj.weight"))
    else:  # Qwen2-MoE always has a shared expert: a width-0 one adds exactly nothing
        layout.zero += [
            (moe + "shared_expert.gate_proj.weight", (0, config.dim)),
            (moe + "shared_expert.up_proj.weight", (0, config.dim)),
            (moe + "shared_expert.down_proj.weight", (config.dim, 0)),
        ]


def _rope_parameters(config: ModelConfig) -> dict:
    scaling = config.rope_scaling
    if scaling.type == "none":
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    common = {
        "rope_type": scaling.type,
        "rope_theta": config.rope_theta,
        "factor": scaling.factor,
        "original_max_position_embeddings": scaling.original_max_seq_len,
    }
    if scaling.type == "llama3":
        return {
            **common,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
        }
    yarn = {**common, "beta_fast": scaling.beta_fast, "beta_slow": scaling.beta_slow}
    if scaling.mscale_all_dim:  # mscale counts only beside it (as in transformers)
        yarn["mscale_all_dim"] = scaling.mscale_all_dim
        if scaling.mscale:
            yarn["mscale"] = scaling.mscale
    return yarn


def _rope_scaling(rope: dict) -> RopeScalingConfig:
    """Our rope scaling for a config.json's rope_parameters (or older rope_scaling)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return RopeScalingConfig()
    if rope_type not in ("llama3", "yarn"):
        raise ConfigError(
            f"rope type {rope_type!r} is not supported (plain rotary embeddings, Llama 3's llama3, or yarn)"
        )

    def number(key: str, default: float | None = None) -> float:
        if rope.get(key) is None:
            if default is None:
                raise ConfigError(f"the {rope_type} rope scaling in config.json lacks {key!r}")
            return default
        try:
            return float(rope[key])
        except (TypeError, ValueError):
            raise ConfigError(
                f"the rope scaling's {key}={rope[key]!r} in config.json is not a number"
            ) from None

    common = dict(type=rope_type, factor=number("factor"))
    common["original_max_seq_len"] = int(number("original_max_position_embeddings"))
    if rope_type == "llama3":
        return RopeScalingConfig(
            **common, low_freq_factor=number("low_freq_factor"), high_freq_factor=number("high_freq_factor")
        )
    if rope.get("attention_factor") is not None or rope.get("truncate", True) is False:
        raise ConfigError("yarn with attention_factor or truncate=false is not supported")
    return RopeScalingConfig(
        **common,
        beta_fast=number("beta_fast", 32.0),
        beta_slow=number("beta_slow", 1.0),
        mscale=number("mscale", 0.0),
        mscale_all_dim=number("mscale_all_dim", 0.0),
    )


def hf_config(config: ModelConfig):
    """The transformers config object for `config`."""
    from transformers import LlamaConfig, MixtralConfig, Qwen2MoeConfig

    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters=_rope_parameters(config),
        tie_word_embeddings=config.tie_embeddings,
        hidden_act="silu",
        torch_dtype="float32",
    )
    arch, moe = architecture(config), config.moe
    if arch in _DEEPSEEK:
        return _deepseek_config(config, arch, common)
    if arch == "llama":
        return LlamaConfig(
            intermediate_size=config.ffn_hidden_dim,
            head_dim=config.head_dim,
            attention_bias=False,
            mlp_bias=False,
            **common,
        )
    if arch == "mixtral":
        return MixtralConfig(
            intermediate_size=config.expert_hidden_dim,
            head_dim=config.head_dim,
            num_local_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            router_aux_loss_coef=moe.aux_loss_coef,
            sliding_window=None,
            **common,
        )
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


def _deepseek_config(config: ModelConfig, arch: str, common: dict):
    from transformers import DeepseekV2Config, DeepseekV3Config

    moe, mla = config.moe, config.mla
    routed = moe.num_experts > 0
    groups = dict(n_group=moe.num_expert_groups, topk_group=moe.topk_groups) if moe.topk_groups else {}
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
    if arch == "deepseek_v3":
        return DeepseekV3Config(
            norm_topk_prob=moe.renormalize,
            rope_interleave=True,
            num_nextn_predict_layers=config.mtp.num_layers,
            **(groups or dict(n_group=1, topk_group=1)),
            **common,
        )
    return DeepseekV2Config(
        topk_method="group_limited_greedy" if groups else "greedy", norm_topk_prob=False, **groups, **common
    )


def check_expressible(config: ModelConfig, arch: str) -> None:
    """A ConfigError naming the first setting `arch` cannot compute exactly."""
    moe, deepseek = config.moe, arch in _DEEPSEEK
    if not moe.num_experts:
        return
    if deepseek:
        dense_first = all(
            config.is_moe_layer(i) == (i >= moe.first_k_dense) for i in range(config.num_layers)
        )
        per_group = {"deepseek_v3": 2, "deepseek_v2": 1}[arch]
        unsupported = {
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
                arch == "deepseek_v2" and moe.renormalize,
                "DeepSeek-V2 (softmax routing) never renormalises; DeepSeek-V3 takes sigmoid scores",
            ),
        }
    else:
        why = (
            "Mixtral and Qwen2-MoE route with a softmax over all the experts, unscaled "
            "(with model.mla: DeepSeek-V2/V3)"
        )
        unsupported = {
            f"model.moe.score_function={moe.score_function}": (moe.score_function != "softmax", why),
            f"model.moe.topk_groups={moe.topk_groups}": (moe.topk_groups != 0, why),
            f"model.moe.routed_scaling_factor={moe.routed_scaling_factor}": (
                moe.routed_scaling_factor != 1.0,
                why,
            ),
        }
    for setting, (used, why) in unsupported.items():
        if used:
            raise ConfigError(f"{setting}: {why}")


def to_hf(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensors (Hub key layout), all contiguous."""
    arch = architecture(config)
    check_expressible(config, arch)
    for key, value in state.items():
        if arch != "deepseek_v3" and key.endswith("router.expert_bias") and torch.count_nonzero(value):
            raise ConfigError(
                f"{key} is not zero: the routing bias of auxiliary-loss-free balancing "
                f"(model.moe.bias_update_rate) picks experts, which {arch} cannot express "
                "(DeepSeek-V3 can: model.mla with sigmoid scores)"
            )
    layout = _layout(config, arch)
    out = {theirs: state[ours] for ours, theirs in layout.plain}
    out.update({theirs: state[ours][rows] for ours, theirs, rows in layout.interleaved})
    for ours, parts in layout.experts:
        for keys, stacked in zip(parts, state[ours].chunk(len(parts), dim=-1)):
            out.update({key: w.T for key, w in zip(keys, stacked)})
    out.update({theirs: 2 * state[ours] for ours, theirs in layout.doubled})
    out.update({theirs: torch.zeros(shape) for theirs, shape in layout.zero})
    out.update({theirs: state[ours].clone() for ours, theirs in layout.copies})  # safetensors: unshared
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf(config: ModelConfig, tensors: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """HF tensors (Hub key layout) -> our state dict; every expected tensor must be there."""
    layout = _layout(config, arch)
    wanted = (
        [k for _, k in layout.plain + layout.doubled]
        + [k for _, k, _ in layout.interleaved]
        + [k for _, parts in layout.experts for keys in parts for k in keys]
        + [k for k, _ in layout.zero]
    )
    missing = [k for k in wanted if k not in tensors]
    if missing:
        raise ConfigError(f"the checkpoint lacks {len(missing)} expected tensors, e.g. {missing[0]}")
    for key, _ in layout.zero:
        if torch.count_nonzero(tensors[key]):
            raise ConfigError(
                f"{key} is not zero: this model gates its shared experts, which ours adds ungated; "
                "not importable"
            )
    state = {ours: tensors[theirs] for ours, theirs in layout.plain}
    state.update({ours: tensors[theirs][rows.argsort()] for ours, theirs, rows in layout.interleaved})
    state.update({ours: tensors[theirs] / 2 for ours, theirs in layout.doubled})
    for ours, parts in layout.experts:
        state[ours] = torch.cat([torch.stack([tensors[k].T for k in keys]) for keys in parts], dim=-1)
    if config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def _moe_placement(pattern: list[bool]) -> tuple[int, int]:
    """(first_k_dense, every_n_layers) whose rule reproduces `pattern`, or a ConfigError."""
    n_layers = len(pattern)
    for first in range(n_layers):
        for every in range(1, n_layers + 1):
            if [i >= first and i % every == 0 for i in range(n_layers)] == pattern:
                return first, every
    raise ConfigError(f"the MoE layer pattern {pattern} is not first-k-dense / every-n-th; not supported")


def _deepseek_from_hf(hf: dict, model_type: str) -> tuple[MoEConfig, MLAConfig]:
    """model.moe and model.mla of a DeepSeek-V2/V3 config.json."""
    if hf.get("quantization_config"):
        raise ConfigError(
            "quantized weights (quantization_config) are not supported; convert them to bf16 first"
        )
    if model_type == "deepseek_v3" and not hf.get("rope_interleave", True):
        raise ConfigError("rope_interleave=false is not supported (DeepSeek's checkpoints interleave)")
    v3 = model_type == "deepseek_v3"
    k, groups, limit = hf["num_experts_per_tok"], hf.get("n_group") or 1, hf.get("topk_group") or 1
    limited = limit < groups and (v3 or hf.get("topk_method", "greedy") == "group_limited_greedy")
    per_group = 2 if v3 else 1
    if limited and k != per_group * limit:
        raise ConfigError(
            f"{model_type} ranks groups by their best {per_group} score(s), ours by the best top_k / "
            f"topk_groups: num_experts_per_tok={k} with topk_group={limit} is not expressible"
        )
    if not v3 and hf.get("topk_method", "greedy") not in ("greedy", "group_limited_greedy"):
        raise ConfigError(
            f"topk_method {hf['topk_method']!r} is not supported (greedy or group_limited_greedy)"
        )
    moe = MoEConfig(
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
    if moe.first_k_dense >= hf["num_hidden_layers"]:
        moe = MoEConfig()
    mla = MLAConfig(
        kv_lora_rank=hf["kv_lora_rank"],
        q_lora_rank=hf.get("q_lora_rank") or 0,
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
    )
    return moe, mla


def from_hf_config(hf: dict) -> tuple[ModelConfig, str]:
    """A transformers config.json (Llama, Mistral, Mixtral, Qwen2-MoE, DeepSeek-V2/V3) -> our
    ModelConfig and its type."""
    try:
        return _from_hf_config(hf)
    except KeyError as e:
        model_type = hf.get("model_type")
        raise ConfigError(f"config.json lacks {e.args[0]!r}, which a {model_type} model has") from None


def _from_hf_config(hf: dict) -> tuple[ModelConfig, str]:
    model_type = hf.get("model_type")
    supported = ("llama", "mistral", "mixtral", "qwen2_moe", *_DEEPSEEK)
    if model_type not in supported:
        raise ConfigError(f"model_type {model_type!r} is not supported; import takes {', '.join(supported)}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_scaling = _rope_scaling(rope)
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("qkv_bias"):
        raise ConfigError("attention or MLP biases are not supported")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if model_type not in _DEEPSEEK and head_dim * heads != hf["hidden_size"]:
        raise ConfigError(
            f"head_dim {head_dim} x {heads} heads != hidden_size {hf['hidden_size']}; not supported"
        )
    max_len = hf.get("max_position_embeddings", 4096)
    if hf.get("sliding_window") and hf.get("use_sliding_window", True):
        max_len = min(max_len, hf["sliding_window"])  # full causal == sliding window up to the window
    moe, mla, mtp = MoEConfig(), MLAConfig(), MTPConfig()
    if model_type in _DEEPSEEK:
        moe, mla = _deepseek_from_hf(hf, model_type)
    if model_type == "deepseek_v3":  # V3 weighed its MTP loss 0.3, then 0.1 for its last 4.8T tokens
        mtp = MTPConfig(num_layers=hf.get("num_nextn_predict_layers") or 0, loss_coef=0.1)
    elif model_type == "mixtral":
        moe = MoEConfig(
            num_experts=hf["num_local_experts"],
            top_k=hf["num_experts_per_tok"],
            renormalize=True,
            aux_loss_coef=hf.get("router_aux_loss_coef", 0.01),
        )
    elif model_type == "qwen2_moe":
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
    config = ModelConfig(
        name=f"{model_type}_import",
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_hidden_dim=hf["intermediate_size"],
        max_seq_len=max_len,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=rope_scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        moe=moe,
        mla=mla,
        mtp=mtp,
    )
    return config, "llama" if model_type == "mistral" else model_type


def read_hf_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and every tensor of a local HF model folder (model.safetensors or shards)."""
    from safetensors.torch import load_file

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder} has no config.json (expected a Hugging Face model folder)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{folder} has no model.safetensors (or index); only safetensors weights are read")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(folder / name))
        except Exception as e:  # missing, cut short (an interrupted download), not safetensors
            raise ConfigError(f"{folder / name} cannot be read: {str(e).strip().splitlines()[0]}") from None
    return _read_json(config_path), tensors


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
