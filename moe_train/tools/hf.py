"""Our models in Hugging Face `transformers` layouts, both ways.

- dense models: Llama;
- MoE models with top-k renormalisation, an MoE in every layer and no shared experts: Mixtral;
- every other MoE model (shared experts, unrenormalised top-k, first-k-dense or every-n-th layers):
  Qwen2-MoE. Its shared expert is multiplied by sigmoid(shared_expert_gate(x)); with that gate's
  weight at zero the factor is exactly 0.5, and the shared down projection is stored doubled (a
  power of two: exact in any float format), so it computes our ungated sum exactly. Its
  `mlp_only_layers` list places dense layers anywhere, and `norm_topk_prob` is our `renormalize`.
  No other architecture in transformers 5 matches: DeepSeek-V2/V3 use MLA attention or sigmoid
  routing, Qwen3-MoE/OLMoE/dots1 have qk-norm, Ernie-4.5-MoE always renormalises and interleaves
  its rotary layout, GraniteMoeShared has no dense layers.
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

from moe_train.config import ConfigError, ModelConfig, MoEConfig

# per layer: (our name, HF name)
_ATTENTION = [
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
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
}


def architecture(config: ModelConfig) -> str:
    """The transformers architecture (model_type) that computes `config` exactly."""
    moe = config.moe
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


def _layout(config: ModelConfig, arch: str) -> _Layout:
    layout = _Layout(
        plain=[("tok_embeddings.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    )
    if not config.tie_embeddings:
        layout.plain.append(("output.weight", "lm_head.weight"))
    shared_hidden = config.moe.num_shared_experts * config.expert_hidden_dim
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        layout.plain += [(ours + a, theirs + b) for a, b in _ATTENTION]
        if not config.is_moe_layer(i):
            layout.plain += [(ours + a, theirs + b) for a, b in _DENSE_FFN]
            continue
        prefix, names = _EXPERT_NAMES[arch]
        moe = theirs + prefix
        layout.plain.append((ours + "ffn.router.gate.weight", moe + "gate.weight"))
        for stacked, parts in (("w13", ("w1", "w3")), ("w2", ("w2",))):
            keys = [
                [moe + f"experts.{e}.{names[part]}.weight" for e in range(config.moe.num_experts)]
                for part in parts
            ]
            layout.experts.append((ours + f"ffn.experts.{stacked}", keys))
        if arch != "qwen2_moe":
            continue
        layout.zero.append((moe + "shared_expert_gate.weight", (1, config.dim)))
        if shared_hidden:
            layout.plain += [
                (ours + "ffn.shared_experts.w1.weight", moe + "shared_expert.gate_proj.weight"),
                (ours + "ffn.shared_experts.w3.weight", moe + "shared_expert.up_proj.weight"),
            ]
            layout.doubled.append(
                (ours + "ffn.shared_experts.w2.weight", moe + "shared_expert.down_proj.weight")
            )
        else:  # Qwen2-MoE always has a shared expert: a width-0 one adds exactly nothing
            layout.zero += [
                (moe + "shared_expert.gate_proj.weight", (0, config.dim)),
                (moe + "shared_expert.up_proj.weight", (0, config.dim)),
                (moe + "shared_expert.down_proj.weight", (config.dim, 0)),
            ]
    return layout


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
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings,
        hidden_act="silu",
        torch_dtype="float32",
    )
    arch, moe = architecture(config), config.moe
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


def to_hf(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensors (Hub key layout), all contiguous."""
    moe = config.moe
    unsupported = {
        f"model.moe.score_function={moe.score_function}": moe.score_function != "softmax",
        f"model.moe.topk_groups={moe.topk_groups}": moe.topk_groups != 0,
        f"model.moe.routed_scaling_factor={moe.routed_scaling_factor}": moe.routed_scaling_factor != 1.0,
    }
    for setting, used in unsupported.items():
        if used:
            raise ConfigError(
                f"{setting}: Mixtral and Qwen2-MoE route with a softmax over all the experts, unscaled"
            )
    for key, value in state.items():
        if key.endswith("router.expert_bias") and torch.count_nonzero(value):
            raise ConfigError(
                f"{key} is not zero: the routing bias of auxiliary-loss-free balancing "
                "(model.moe.bias_update_rate) picks experts, which Mixtral and Qwen2-MoE cannot express"
            )
    layout = _layout(config, architecture(config))
    out = {theirs: state[ours] for ours, theirs in layout.plain}
    for ours, parts in layout.experts:
        for keys, stacked in zip(parts, state[ours].chunk(len(parts), dim=-1)):
            out.update({key: w.T for key, w in zip(keys, stacked)})
    out.update({theirs: 2 * state[ours] for ours, theirs in layout.doubled})
    out.update({theirs: torch.zeros(shape) for theirs, shape in layout.zero})
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf(config: ModelConfig, tensors: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """HF tensors (Hub key layout) -> our state dict; every expected tensor must be there."""
    layout = _layout(config, arch)
    wanted = (
        [k for _, k in layout.plain + layout.doubled]
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


def from_hf_config(hf: dict) -> tuple[ModelConfig, str]:
    """A transformers config.json (Llama, Mistral, Mixtral, Qwen2-MoE) -> our ModelConfig and its type."""
    model_type = hf.get("model_type")
    if model_type not in ("llama", "mistral", "mixtral", "qwen2_moe"):
        raise ConfigError(
            f"model_type {model_type!r} is not supported; import takes llama, mistral, mixtral or qwen2_moe"
        )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"rope type {rope_type!r} is not supported (only plain rotary embeddings)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("qkv_bias"):
        raise ConfigError("attention or MLP biases are not supported")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise ConfigError(
            f"head_dim {head_dim} x {heads} heads != hidden_size {hf['hidden_size']}; not supported"
        )
    max_len = hf.get("max_position_embeddings", 4096)
    if hf.get("sliding_window") and hf.get("use_sliding_window", True):
        max_len = min(max_len, hf["sliding_window"])  # full causal == sliding window up to the window
    moe = MoEConfig()
    if model_type == "mixtral":
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
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        moe=moe,
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
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{folder} has no model.safetensors (or index); only safetensors weights are read")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(folder / name))
    return json.loads(config_path.read_text()), tensors
