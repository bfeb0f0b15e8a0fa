"""The model's configuration: `ModelConfig` and its sections (MoE routing, rotary scaling, latent
attention, multi-token prediction). Each field documents the schema; each check names its key."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moe_train.config.checks import at_least, check, is_finite, one_of, positive


@dataclass
class MoEConfig:
    num_experts: int = 0
    """Routed experts per MoE layer; 0 makes every layer a dense FFN."""
    top_k: int = 2
    """Experts each token is routed to."""
    num_shared_experts: int = 0
    """Experts every token passes through (DeepSeekMoE), each of size `expert_hidden_dim`."""
    expert_hidden_dim: int | None = None
    """Hidden size of one expert's SwiGLU; None uses model.ffn_hidden_dim. Smaller = fine-grained."""
    first_k_dense: int = 0
    """The first k layers keep a dense FFN (DeepSeekMoE uses 1)."""
    every_n_layers: int = 1
    """Layer i (i >= first_k_dense) is MoE when i % every_n_layers == 0 (Switch/GShard use 2)."""
    score_function: str = "softmax"
    """The router's score per expert: `softmax` over the experts (Mixtral, DBRX, DeepSeekMoE) or
    `sigmoid`, each expert's own (DeepSeek-V3, usually with renormalize and bias_update_rate)."""
    renormalize: bool = True
    """Rescale the top-k router scores to sum to 1 (Mixtral: yes, DeepSeekMoE: no)."""
    aux_loss_coef: float = 0.01
    """Weight of the Switch/GShard load-balancing loss (mean over MoE layers; 1.0 when balanced)."""
    aux_loss_scope: str = "batch"
    """What the aux loss balances: `batch`, each rank's micro-batch as a whole (Switch/GShard,
    Megatron-Core's aux_loss); `sequence`, each sequence on its own, averaged (DeepSeek-V3's
    complementary sequence-wise loss, Megatron-Core's seq_aux_loss; V3 weighs it 0.0001)."""
    num_expert_groups: int = 1
    """The routed experts as this many groups of consecutive experts, the unit the device-level
    balance loss balances. Under expert parallelism rank r holds the r-th of parallel.ep such
    groups, so num_expert_groups = parallel.ep makes them the devices (DeepSeekMoE's D devices)."""
    topk_groups: int = 0
    """Group-limited routing (DeepSeek-V2's device-limited, DeepSeek-V3's node-limited routing):
    each token's top_k experts come from at most this many of the num_expert_groups groups, those
    whose top (top_k / topk_groups) scores sum highest (as Megatron-Core's moe_router_group_topk).
    With num_expert_groups = parallel.ep a token is sent to at most this many ranks. 0: off."""
    routed_scaling_factor: float = 1.0
    """Multiplies the routed experts' combine weights, after any renormalisation (DeepSeek-V3's
    routed scaling factor, 2.5; Megatron-Core's moe_router_topk_scaling_factor)."""
    device_aux_loss_coef: float = 0.0
    """Weight of DeepSeekMoE's device-level balance loss, sum over groups g of mean_{e in g}(f_e) *
    sum_{e in g}(P_e), with f_e normalised so that balance gives 1 (mean over MoE layers; 1.0 when
    the groups are balanced, whatever the experts inside them do). It lets the experts of a device
    specialise while the devices stay evenly loaded: DeepSeekMoE 145B pairs a small aux_loss_coef
    (0.003) with this one (0.05). 0: off."""
    z_loss_coef: float = 0.001
    """Weight of the ST-MoE router z-loss (mean over MoE layers)."""
    capacity_factor: float | None = None
    """None = dropless. Otherwise each expert takes at most ceil(capacity_factor * tokens * top_k /
    num_experts) tokens per micro-batch and rank; the rest of its assignments are dropped."""
    bias_update_rate: float = 0.0
    """Auxiliary-loss-free load balancing (DeepSeek-V3): above 0, a per-expert bias is added to the
    router scores for the top-k choice only (the combine weights stay the scores),
    and after each optimizer step it moves by this much toward balance: up for the experts that got
    fewer than the mean share of the global batch's assignments, down for those that got more.
    Usually with a small or zero aux_loss_coef, and with score_function=sigmoid as in DeepSeek-V3
    (Megatron-Core allows it only there; here it works on softmax scores too). 0: off."""

    def __post_init__(self) -> None:
        # every field in range, also on a dense model (where they are unused): a NaN is a mistake
        for key in ("num_experts", "num_shared_experts", "first_k_dense", "topk_groups"):
            at_least(f"model.moe.{key}", getattr(self, key), 0)
        for key in ("top_k", "every_n_layers", "num_expert_groups"):
            at_least(f"model.moe.{key}", getattr(self, key), 1)
        if self.expert_hidden_dim is not None:
            positive("model.moe.expert_hidden_dim", self.expert_hidden_dim, "or null: model.ffn_hidden_dim")
        for key in ("aux_loss_coef", "device_aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            at_least(f"model.moe.{key}", getattr(self, key), 0, "0 turns it off")
        positive("model.moe.routed_scaling_factor", self.routed_scaling_factor)
        if self.capacity_factor is not None:
            positive("model.moe.capacity_factor", self.capacity_factor, "or null for dropless")
        one_of("model.moe.score_function", self.score_function, ("softmax", "sigmoid"))
        one_of("model.moe.aux_loss_scope", self.aux_loss_scope, ("batch", "sequence"))
        if self.num_experts == 0:
            check(
                self.num_shared_experts == 0,
                "model.moe.num_shared_experts needs routed experts (model.moe.num_experts > 0)",
            )
            return
        check(
            1 <= self.top_k <= self.num_experts,
            f"model.moe.top_k={self.top_k} must be between 1 and model.moe.num_experts={self.num_experts}",
        )
        check(
            self.num_expert_groups >= 1 and self.num_experts % self.num_expert_groups == 0,
            f"model.moe.num_expert_groups={self.num_expert_groups} must be >= 1 and divide "
            f"model.moe.num_experts={self.num_experts}",
        )
        if self.topk_groups:
            per_group = self.num_experts // self.num_expert_groups
            check(
                1 <= self.topk_groups < self.num_expert_groups
                and self.topk_groups <= self.top_k <= self.topk_groups * per_group,
                f"model.moe.topk_groups={self.topk_groups} must be between 1 and "
                f"model.moe.num_expert_groups - 1 ({self.num_expert_groups - 1}), at most "
                f"model.moe.top_k={self.top_k}, and its groups must hold top_k experts "
                f"({per_group} each); 0 turns group-limited routing off",
            )


@dataclass
class RopeScalingConfig:
    type: str = "none"
    """`none`; `llama3`: Llama 3.1's frequency-dependent scaling of the rotary frequencies
    (wavelengths above original_max_seq_len / low_freq_factor are divided by factor, those below
    original_max_seq_len / high_freq_factor kept, the ones between interpolated), which imported
    Llama 3.x models need; `yarn`: YaRN (Peng et al. 2023), which DeepSeek-V2/V3 and Qwen use:
    frequencies that turn fewer than beta_slow times over original_max_seq_len are divided by
    factor, those that turn more than beta_fast times kept, a linear ramp between, and the
    attention logits scaled up with log(factor)."""
    factor: float = 8.0
    """How much longer than original_max_seq_len the context becomes."""
    low_freq_factor: float = 1.0
    """llama3 only."""
    high_freq_factor: float = 4.0
    """llama3 only."""
    original_max_seq_len: int = 8192
    """The context length the frequencies were first trained for."""
    beta_fast: float = 32.0
    """yarn: rotations over original_max_seq_len above which a frequency is kept."""
    beta_slow: float = 1.0
    """yarn: rotations below which a frequency is divided by factor."""
    mscale: float = 0.0
    """yarn: with mscale_all_dim, the cos/sin tables are scaled by m(mscale) / m(mscale_all_dim),
    where m(s) = 1 + 0.1 s ln(factor); otherwise (mscale alone is ignored, as in transformers) by
    m(1), YaRN's own sqrt(1/t)."""
    mscale_all_dim: float = 0.0
    """yarn: see mscale; with multi-head latent attention the softmax scale is also multiplied by
    m(mscale_all_dim)^2 (DeepSeek-V2/V3: 0.707 and 1.0, so their tables are not scaled)."""

    def __post_init__(self) -> None:
        one_of("model.rope_scaling.type", self.type, ("none", "llama3", "yarn"))
        if self.type == "llama3":
            check(
                0 < self.low_freq_factor < self.high_freq_factor < math.inf,
                f"model.rope_scaling.low_freq_factor={self.low_freq_factor} must be > 0 and below "
                f"model.rope_scaling.high_freq_factor={self.high_freq_factor}, a finite number",
            )
        if self.type == "yarn":
            check(
                0 < self.beta_slow < self.beta_fast < math.inf,
                f"model.rope_scaling.beta_slow={self.beta_slow} and beta_fast={self.beta_fast} must be "
                "finite numbers with 0 < beta_slow < beta_fast",
            )
        # every field in range, also those the type does not use: a NaN is a mistake wherever it is
        at_least("model.rope_scaling.factor", self.factor, 1)
        positive("model.rope_scaling.original_max_seq_len", self.original_max_seq_len)
        for key in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
            positive(f"model.rope_scaling.{key}", getattr(self, key))
        for key in ("mscale", "mscale_all_dim"):
            value = getattr(self, key)
            check(
                value >= 0 and math.isfinite(value),
                f"model.rope_scaling.{key}={value} must be a finite number >= 0",
            )


@dataclass
class MLAConfig:
    kv_lora_rank: int = 0
    """Multi-head latent attention (DeepSeek-V2/V3) when > 0: keys and values are projected up from
    a latent of this width per token (what an inference cache keeps), each head's query and key
    split into a part without position (qk_nope_head_dim) and a rotary part (qk_rope_head_dim, its
    key shared by all heads). model.num_kv_heads is then unused and head sizes are the ones below.
    0: grouped-query attention."""
    q_lora_rank: int = 0
    """The query goes through a low-rank latent of this width (DeepSeek-V3: 1536); 0: a full
    projection (DeepSeek-V2-Lite)."""
    qk_nope_head_dim: int = 128
    """Per-head query and key size without position information."""
    qk_rope_head_dim: int = 64
    """Per-head query and key size with rotary embeddings (even)."""
    v_head_dim: int = 128
    """Per-head value size."""

    @property
    def enabled(self) -> bool:
        return self.kv_lora_rank > 0

    def __post_init__(self) -> None:
        # checked also when off (kv_lora_rank=0), where they are unused: a NaN is a mistake
        at_least("model.mla.kv_lora_rank", self.kv_lora_rank, 0, "0: grouped-query attention")
        at_least("model.mla.q_lora_rank", self.q_lora_rank, 0, "0: a full query projection")
        for key in ("qk_nope_head_dim", "v_head_dim"):
            positive(f"model.mla.{key}", getattr(self, key))
        check(
            self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,  # NaN and inf fail: % 2 is NaN
            f"model.mla.qk_rope_head_dim={self.qk_rope_head_dim} must be even and > 0",
        )


@dataclass
class MTPConfig:
    num_layers: int = 0
    """Multi-token prediction depths (DeepSeek-V3: 1). Depth k adds a module that predicts token
    i + k + 1 at position i: it projects [RMSNorm(embedding of token i + k); RMSNorm(depth k-1's
    hidden state at i)] back to model.dim and runs one more transformer block (an MoE one where the
    MoE layer pattern puts one), then the shared output head. Training only: evaluation, generation
    and the exported model's logits are the main model's. 0: off."""
    loss_coef: float = 0.3
    """Weight of the mean of the depths' cross-entropies in the training loss (DeepSeek-V3: 0.3
    for its first 10T tokens, then 0.1)."""

    def __post_init__(self) -> None:
        at_least("model.mtp.num_layers", self.num_layers, 0, "0 turns it off")
        finite = is_finite(self.loss_coef)
        check(
            self.loss_coef >= 0 and finite,
            f"model.mtp.loss_coef={self.loss_coef} must be a number >= 0"
            + ("" if finite else " (a finite one)"),
        )


@dataclass
class ModelConfig:
    name: str = "model"
    """Preset name; names the run directory by default."""
    vocab_size: int | None = None
    """Vocabulary size; None follows the tokenizer of the data."""
    dim: int = 256
    """Residual stream width."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 8
    """Query heads; head size is dim / num_heads (with model.mla, the sizes set there)."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None = num_heads (multi-head attention)."""
    ffn_hidden_dim: int = 1024
    """Hidden size of the dense SwiGLU FFN (and of each expert unless moe.expert_hidden_dim is set)."""
    max_seq_len: int = 2048
    """Longest sequence the rotary tables are built for."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """Scaling of the rotary frequencies (off by default)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections are scaled by 1/sqrt(2 * num_layers)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-Experts settings."""
    mla: MLAConfig = field(default_factory=MLAConfig)
    """Multi-head latent attention settings (off by default: grouped-query attention)."""
    mtp: MTPConfig = field(default_factory=MTPConfig)
    """Multi-token prediction (off by default)."""

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        for key in (
            "dim",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "ffn_hidden_dim",
            "max_seq_len",
            "rope_theta",
            "norm_eps",
            "init_std",
        ):
            positive(f"model.{key}", getattr(self, key))
        if self.vocab_size is not None:
            positive("model.vocab_size", self.vocab_size, "or null to follow the data's tokenizer")
        if not self.mla.enabled:  # with MLA the head sizes are model.mla's
            check(
                self.dim % self.num_heads == 0,
                f"model.dim={self.dim} must be divisible by model.num_heads={self.num_heads}",
            )
            check(
                self.num_heads % self.num_kv_heads == 0,
                f"model.num_heads={self.num_heads} must be divisible by "
                f"model.num_kv_heads={self.num_kv_heads}",
            )
            check(
                self.head_dim % 2 == 0,
                f"model.dim / model.num_heads = {self.head_dim} must be even for rotary embeddings",
            )
        if self.moe.num_experts:
            check(
                self.moe.first_k_dense < self.num_layers,
                f"model.moe.first_k_dense={self.moe.first_k_dense} leaves no MoE layer in "
                f"model.num_layers={self.num_layers}",
            )
            check(
                any(self.is_moe_layer(i) for i in range(self.num_layers)),
                f"model.moe.every_n_layers={self.moe.every_n_layers} leaves no MoE layer among layers "
                f"{self.moe.first_k_dense} to {self.num_layers - 1} (model.moe.first_k_dense="
                f"{self.moe.first_k_dense}, model.num_layers={self.num_layers}): a layer is MoE when "
                "its index is a multiple of every_n_layers",
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dim(self) -> int:
        """Rotary dimensions per head: the whole head, or MLA's rotary part."""
        return self.mla.qk_rope_head_dim if self.mla.enabled else self.head_dim

    @property
    def attention_head_dims(self) -> tuple[int, int]:
        """(query/key, value) sizes per head."""
        if self.mla.enabled:
            return self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim, self.mla.v_head_dim
        return self.head_dim, self.head_dim

    @property
    def expert_hidden_dim(self) -> int:
        return self.moe.expert_hidden_dim or self.ffn_hidden_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        moe = self.moe
        return moe.num_experts > 0 and layer_id >= moe.first_k_dense and layer_id % moe.every_n_layers == 0
