"""What an architecture adapter is, and the part of the Hub's key layout that every architecture
shares: embeddings, norms, grouped-query attention, dense FFNs, and a router with routed experts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moe_train.config import ConfigError, ModelConfig

# per layer: (our name, HF name)
NORMS = [
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
]
ATTENTION = [
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
]
# our SwiGLU weights -> HF's names, in the order they are laid out
MLP_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
DENSE_FFN = [(f"ffn.{ours}.weight", f"mlp.{theirs}.weight") for ours, theirs in MLP_NAMES.items()]


@dataclass
class Layout:
    """Where each tensor of our state dict goes in an HF checkpoint, and how it is transformed.
    Expert keys are the Hub's per-expert ones, which transformers 5 also writes and fuses on load."""

    plain: list[tuple[str, str]] = field(default_factory=list)  # copied as is
    # stacked (E, in, parts * out) <-> per expert (out, in), for each part: w13 is [gate | up]
    experts: list[tuple[str, list[list[str]]]] = field(default_factory=list)
    doubled: list[tuple[str, str]] = field(default_factory=list)  # Qwen2-MoE shared down projection
    zero: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # HF-only tensors fixed at 0
    # MLA rows in DeepSeek's order: theirs = ours[rows], ours = theirs[rows.argsort()]
    interleaved: list[tuple[str, str, torch.Tensor]] = field(default_factory=list)
    copies: list[tuple[str, str]] = field(default_factory=list)  # written out again, not read back


class Adapter:
    """One transformers architecture: which of our models it computes exactly, its config.json
    both ways, and where its checkpoint keeps each of our tensors. Subclasses override what
    differs from a Llama with routed experts."""

    model_type: str  # transformers' name, config.json's model_type
    aliases: tuple[str, ...] = ()  # other model types imported the same way
    latent_attention = False  # multi-head latent attention: head sizes of its own, not dim / heads
    routing_bias = False  # has a place for our routing bias (model.moe.bias_update_rate)
    moe_prefix = "mlp."  # the MoE block's keys, under a layer's
    expert_names = MLP_NAMES

    def claims(self, config: ModelConfig) -> bool:
        """Whether this is the architecture `config` exports to."""
        raise NotImplementedError

    def check_expressible(self, config: ModelConfig) -> None:
        """A ConfigError naming the first routing setting this architecture cannot compute exactly."""

    def hf_config(self, config: ModelConfig, common: dict):
        """The transformers config object; `common` holds the fields every architecture has."""
        raise NotImplementedError

    def from_hf(self, hf: dict) -> dict:
        """The ModelConfig sections (moe, mla, mtp) that a config.json of this type sets."""
        return {}

    def layout(self, config: ModelConfig) -> Layout:
        """Every tensor's key in our state dict and in the Hub's checkpoint."""
        embeddings = ("tok_embeddings.weight", "model.embed_tokens.weight")
        layout = Layout(plain=[embeddings, ("norm.weight", "model.norm.weight")])
        if not config.tie_embeddings:
            layout.plain.append(("output.weight", "lm_head.weight"))
        for i in range(config.num_layers):
            self.block_layout(layout, config, i, f"layers.{i}.", f"model.layers.{i}.")
        return layout

    def block_layout(self, layout: Layout, config: ModelConfig, i: int, ours: str, theirs: str) -> None:
        """Add transformer block `i` (our keys under `ours`, theirs under `theirs`) to `layout`."""
        layout.plain += [(ours + a, theirs + b) for a, b in NORMS]
        self.attention_layout(layout, config, ours, theirs)
        if config.is_moe_layer(i):
            self.moe_layout(layout, config, ours, theirs)
        else:
            layout.plain += [(ours + a, theirs + b) for a, b in DENSE_FFN]

    def attention_layout(self, layout: Layout, config: ModelConfig, ours: str, theirs: str) -> None:
        layout.plain += [(ours + a, theirs + b) for a, b in ATTENTION]

    def moe_layout(self, layout: Layout, config: ModelConfig, ours: str, theirs: str) -> None:
        """The router and the routed experts; subclasses add the rest of their MoE block."""
        moe = theirs + self.moe_prefix
        layout.plain.append((ours + "ffn.router.gate.weight", moe + "gate.weight"))
        for stacked, parts in (("w13", ("w1", "w3")), ("w2", ("w2",))):
            keys = [
                [moe + f"experts.{e}.{self.expert_names[part]}.weight" for e in range(config.moe.num_experts)]
                for part in parts
            ]
            layout.experts.append((ours + f"ffn.experts.{stacked}", keys))


def empty_mlp(prefix: str, dim: int) -> list[tuple[str, tuple[int, ...]]]:
    """The zero-size tensors of a width-0 SwiGLU MLP under `prefix`, which adds exactly nothing:
    for a checkpoint layout that always has shared experts, written for a model without them."""
    return [
        (f"{prefix}{theirs}.weight", (dim, 0) if theirs == "down_proj" else (0, dim))
        for theirs in MLP_NAMES.values()
    ]


def refuse_unsupported(unsupported: dict[str, tuple[bool, str]]) -> None:
    """A ConfigError for the first setting in use, given {setting: (used, why)}."""
    for setting, (used, why) in unsupported.items():
        if used:
            raise ConfigError(f"{setting}: {why}")
