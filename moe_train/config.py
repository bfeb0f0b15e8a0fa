"""The typed configuration tree that Hydra composes into, with validation.

Every field has a comment saying what it means. Checks raise `ConfigError` naming the key and what is
allowed; `train.py` turns that into one line on stderr and exit code 2. Nothing here imports hydra.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A user-facing configuration mistake: the message names the key and what is allowed."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (or its type's name): how a library's error is quoted
    in our one-line messages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{key}={value!r} is not allowed; choose one of {', '.join(allowed)}")


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
        _check(self.num_experts >= 0, f"model.moe.num_experts={self.num_experts} must be >= 0")
        if self.num_experts == 0:
            _check(
                self.num_shared_experts == 0,
                "model.moe.num_shared_experts needs routed experts (model.moe.num_experts > 0)",
            )
            return
        _check(
            1 <= self.top_k <= self.num_experts,
            f"model.moe.top_k={self.top_k} must be between 1 and model.moe.num_experts={self.num_experts}",
        )
        _check(
            self.num_shared_experts >= 0,
            f"model.moe.num_shared_experts={self.num_shared_experts} must be >= 0",
        )
        _check(
            self.expert_hidden_dim is None or self.expert_hidden_dim > 0,
            f"model.moe.expert_hidden_dim={self.expert_hidden_dim} must be > 0",
        )
        _one_of("model.moe.score_function", self.score_function, ("softmax", "sigmoid"))
        _one_of("model.moe.aux_loss_scope", self.aux_loss_scope, ("batch", "sequence"))
        _check(self.first_k_dense >= 0, f"model.moe.first_k_dense={self.first_k_dense} must be >= 0")
        _check(self.every_n_layers >= 1, f"model.moe.every_n_layers={self.every_n_layers} must be >= 1")
        _check(self.aux_loss_coef >= 0, f"model.moe.aux_loss_coef={self.aux_loss_coef} must be >= 0")
        _check(self.z_loss_coef >= 0, f"model.moe.z_loss_coef={self.z_loss_coef} must be >= 0")
        _check(
            self.num_expert_groups >= 1 and self.num_experts % self.num_expert_groups == 0,
            f"model.moe.num_expert_groups={self.num_expert_groups} must be >= 1 and divide "
            f"model.moe.num_experts={self.num_experts}",
        )
        if self.topk_groups:
            per_group = self.num_experts // self.num_expert_groups
            _check(
                1 <= self.topk_groups < self.num_expert_groups
                and self.topk_groups <= self.top_k <= self.topk_groups * per_group,
                f"model.moe.topk_groups={self.topk_groups} must be between 1 and "
                f"model.moe.num_expert_groups - 1 ({self.num_expert_groups - 1}), at most "
                f"model.moe.top_k={self.top_k}, and its groups must hold top_k experts "
                f"({per_group} each); 0 turns group-limited routing off",
            )
        _check(
            self.routed_scaling_factor > 0,
            f"model.moe.routed_scaling_factor={self.routed_scaling_factor} must be > 0",
        )
        _check(
            self.device_aux_loss_coef >= 0,
            f"model.moe.device_aux_loss_coef={self.device_aux_loss_coef} must be >= 0",
        )
        _check(
            self.capacity_factor is None or self.capacity_factor > 0,
            f"model.moe.capacity_factor={self.capacity_factor} must be > 0 (or null for dropless)",
        )
        _check(self.bias_update_rate >= 0, f"model.moe.bias_update_rate={self.bias_update_rate} must be >= 0")


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
        _one_of("model.rope_scaling.type", self.type, ("none", "llama3", "yarn"))
        if self.type == "none":
            return
        _check(
            self.factor >= 1 and math.isfinite(self.factor),
            f"model.rope_scaling.factor={self.factor} must be a finite number >= 1",
        )
        _check(
            self.original_max_seq_len > 0,
            f"model.rope_scaling.original_max_seq_len={self.original_max_seq_len} must be > 0",
        )
        if self.type == "llama3":
            _check(
                0 < self.low_freq_factor < self.high_freq_factor < math.inf,
                f"model.rope_scaling.low_freq_factor={self.low_freq_factor} must be > 0 and below "
                f"model.rope_scaling.high_freq_factor={self.high_freq_factor}, a finite number",
            )
            return
        _check(
            0 < self.beta_slow < self.beta_fast < math.inf,
            f"model.rope_scaling.beta_slow={self.beta_slow} and beta_fast={self.beta_fast} must be "
            "finite numbers with 0 < beta_slow < beta_fast",
        )
        for key in ("mscale", "mscale_all_dim"):
            value = getattr(self, key)
            _check(
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
        _check(self.kv_lora_rank >= 0, f"model.mla.kv_lora_rank={self.kv_lora_rank} must be >= 0")
        if not self.enabled:
            return
        for key in ("qk_nope_head_dim", "v_head_dim"):
            value = getattr(self, key)
            _check(value > 0, f"model.mla.{key}={value} must be > 0")
        _check(self.q_lora_rank >= 0, f"model.mla.q_lora_rank={self.q_lora_rank} must be >= 0")
        _check(
            self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
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
        _check(self.num_layers >= 0, f"model.mtp.num_layers={self.num_layers} must be >= 0")
        _check(
            self.loss_coef >= 0 and math.isfinite(self.loss_coef),
            f"model.mtp.loss_coef={self.loss_coef} must be a number >= 0",
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
        ):
            value = getattr(self, key)
            _check(value > 0, f"model.{key}={value} must be > 0")
        _check(
            self.vocab_size is None or self.vocab_size > 0, f"model.vocab_size={self.vocab_size} must be > 0"
        )
        if not self.mla.enabled:  # with MLA the head sizes are model.mla's
            _check(
                self.dim % self.num_heads == 0,
                f"model.dim={self.dim} must be divisible by model.num_heads={self.num_heads}",
            )
            _check(
                self.num_heads % self.num_kv_heads == 0,
                f"model.num_heads={self.num_heads} must be divisible by "
                f"model.num_kv_heads={self.num_kv_heads}",
            )
            _check(
                self.head_dim % 2 == 0,
                f"model.dim / model.num_heads = {self.head_dim} must be even for rotary embeddings",
            )
        _check(self.norm_eps > 0, f"model.norm_eps={self.norm_eps} must be > 0")
        _check(self.init_std > 0, f"model.init_std={self.init_std} must be > 0")
        if self.moe.num_experts:
            _check(
                self.moe.first_k_dense < self.num_layers,
                f"model.moe.first_k_dense={self.moe.first_k_dense} leaves no MoE layer in "
                f"model.num_layers={self.num_layers}",
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


@dataclass
class DataConfig:
    name: str = "stdlib"
    """`stdlib`: the Python standard library's sources (present wherever Python is), prepared once into
    an indexed dataset with a BPE trained on them; `stdlib_bytes`: the same files byte-level, in
    memory; `indexed`: corpora prepared with `python -m moe_train.tools.prepare_data`, in `prefixes`."""
    seq_len: int = 256
    """Tokens per training sequence."""
    prefixes: list[str] = field(default_factory=list)
    """data=indexed: dataset paths without .bin/.idx."""
    weights: list[float] | None = None
    """data=indexed: sampling weight of each prefix (None: in proportion to their sizes)."""
    split: str = "98,2,0"
    """Train, validation, test weights over each corpus's documents (stdlib_bytes: over files)."""
    tokenizer: str | None = None
    """data=indexed: a tokenizer.json; None uses the one beside the first prefix."""
    vocab_size: int = 4096
    """data=stdlib: vocabulary of the byte-level BPE trained on the corpus."""
    cache_dir: str = "~/.cache/moe_train"
    """Where the stdlib corpus is prepared and megatron's sample indices are cached."""

    def __post_init__(self) -> None:
        _one_of("data.name", self.name, ("stdlib", "stdlib_bytes", "indexed"))
        _check(self.seq_len > 0, f"data.seq_len={self.seq_len} must be > 0")
        _check(self.vocab_size > 256, f"data.vocab_size={self.vocab_size} must be > 256 (a byte-level BPE)")
        weights = _split_weights(self.split)
        _check(
            len(weights) == 3 and min(weights) >= 0 and weights[1] > 0,
            f"data.split={self.split!r} must be three weights train,validation,test with validation > 0 "
            "(e.g. 98,2,0)",
        )
        if self.name == "indexed":
            _check(
                bool(self.prefixes), "data.prefixes must list at least one prepared corpus for data=indexed"
            )
        if self.weights is not None:
            _check(
                len(self.weights) == len(self.prefixes),
                f"data.weights has {len(self.weights)} entries but data.prefixes has {len(self.prefixes)}",
            )
            _check(all(w > 0 for w in self.weights), f"data.weights={self.weights} must all be > 0")

    @property
    def val_fraction(self) -> float:
        train, val, test = _split_weights(self.split)
        return val / (train + val + test)


def _split_weights(split: str) -> list[float]:
    try:
        return [float(w) for w in split.split(",")]
    except ValueError:
        return []


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    schedule: str = "cosine"
    """After the warmup: `cosine` decays to lr * min_lr_ratio at trainer.max_steps; `linear` the
    same, in a straight line; `wsd` (warmup-stable-decay) holds lr, then decays linearly to
    lr * min_lr_ratio over the last decay_fraction of trainer.max_steps. Until its decay starts, a
    wsd run does not depend on trainer.max_steps: resumed with a larger one, it trains on as if it
    had been planned that long (cosine and linear would jump)."""
    min_lr_ratio: float = 0.1
    """The schedule ends at lr * min_lr_ratio at trainer.max_steps."""
    warmup_steps: int = 20
    """Linear warmup from 0 to lr over this many optimizer steps."""
    decay_fraction: float = 0.2
    """optim.schedule=wsd: the share of trainer.max_steps spent in the final decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay; never applied to norms, biases or embeddings."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def __post_init__(self) -> None:
        _check(self.lr > 0 and math.isfinite(self.lr), f"optim.lr={self.lr} must be a positive number")
        _one_of("optim.schedule", self.schedule, ("cosine", "linear", "wsd"))
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        _check(0 <= self.decay_fraction <= 1, f"optim.decay_fraction={self.decay_fraction} must be in [0, 1]")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _check(0 <= self.beta1 < 1, f"optim.beta1={self.beta1} must be in [0, 1)")
        _check(0 <= self.beta2 < 1, f"optim.beta2={self.beta2} must be in [0, 1)")
        _check(self.eps > 0, f"optim.eps={self.eps} must be > 0")
        _check(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0")


@dataclass
class TrainerConfig:
    max_steps: int = 350
    """Optimizer steps of the whole run; the LR schedule follows it."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all ranks."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward on one rank; the rest of the rank's share is gradient
    accumulation. null: the rank's whole share (global_batch_size / ranks), no accumulation."""
    seed: int = 1234
    """Seeds the initialisation, the data order and the sampling."""
    out_dir: str = "runs/default"
    """The run directory: metrics.jsonl, checkpoints/, wandb/, .hydra/ (a leading ~ is the home)."""
    init_from: str | None = None
    """A checkpoint (a run's, or one written by the tools: import_hf, upcycle, depth_upscale), or a
    run directory (its newest complete checkpoint), whose model architecture and weights a new run
    starts from, with a fresh optimizer at step 0; model.* overrides on the command line apply over
    its architecture (e.g. model.moe.aux_loss_coef), a model= preset does not. Ignored once the run
    has checkpoints of its own (then it resumes)."""
    resume: str = "auto"
    """`auto`: newest complete checkpoint in out_dir if any; `none`: start fresh (refuses to
    overwrite a run that has checkpoints); or a path to a checkpoint directory."""
    device: str = "auto"
    """`auto` (cuda if available, else cpu), `cpu` or `cuda`."""
    precision: str = "auto"
    """`auto` (bf16 autocast on GPU, fp32 on CPU), `fp32` or `bf16`."""
    compile: bool = False
    """torch.compile each transformer block (the expert dispatch and the experts stay eager)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""
    eval_every: int = 100
    """Validation loss every N optimizer steps (and at the end); 0 disables."""
    eval_batches: int = 8
    """Global batches of the validation split per evaluation (the same sequences at any layout)."""
    ckpt_every: int = 100
    """Checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_last: int = 2
    """Complete checkpoints kept in out_dir/checkpoints; older ones are deleted."""
    async_checkpoint: bool = False
    """Write checkpoints in the background: a save stops training only while the state is copied
    into host memory (as much again as the checkpoint), and its folder becomes complete (renamed)
    once every rank's files are written, by the next save or the end of the run at the latest."""
    exit_after_steps: int | None = None
    """Stop after this many steps in this invocation, with a checkpoint (the schedule still follows
    max_steps); for schedulers' time slots."""
    exit_after_minutes: float | None = None
    """Stop after this many minutes of training in this invocation, with a checkpoint."""
    log_every: int = 1
    """Write metrics every N optimizer steps."""
    num_samples: int = 3
    """Samples generated and printed at the end of training."""
    sample_tokens: int = 150
    """Tokens per generated sample."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "global_batch_size", "micro_batch_size", "eval_batches", "log_every"):
            value = getattr(self, key)
            _check(value is None or value > 0, f"trainer.{key}={value} must be > 0")
        for key in ("eval_every", "ckpt_every", "num_samples", "sample_tokens"):
            value = getattr(self, key)
            _check(value >= 0, f"trainer.{key}={value} must be >= 0")
        _check(self.keep_last >= 1, f"trainer.keep_last={self.keep_last} must be >= 1")
        _check(0 <= self.seed < 2**32, f"trainer.seed={self.seed} must be between 0 and 2**32 - 1")
        self.out_dir = os.path.expanduser(self.out_dir)
        _check(
            self.micro_batch_size is None or self.global_batch_size % self.micro_batch_size == 0,
            f"trainer.global_batch_size={self.global_batch_size} must be divisible by "
            f"trainer.micro_batch_size={self.micro_batch_size}",
        )
        _check(bool(self.resume), "trainer.resume must be `auto`, `none` or a checkpoint path")
        _one_of("trainer.device", self.device, ("auto", "cpu", "cuda"))
        _one_of("trainer.precision", self.precision, ("auto", "fp32", "bf16"))
        _check(
            self.exit_after_steps is None or self.exit_after_steps > 0,
            f"trainer.exit_after_steps={self.exit_after_steps} must be > 0",
        )
        _check(
            self.exit_after_minutes is None or self.exit_after_minutes > 0,
            f"trainer.exit_after_minutes={self.exit_after_minutes} must be > 0",
        )


@dataclass
class ParallelConfig:
    ep: int = 1
    """Expert-parallel degree: each MoE layer's experts are split over this many ranks."""
    timeout_minutes: float = 5.0
    """A collective that waits longer than this fails with an error naming it (no silent hang)."""
    ep_overlap_chunks: int = 1
    """> 1: cut each MoE layer's tokens into this many chunks and overlap one chunk's all-to-all
    with another's expert compute, forward and backward. 1 (default): no overlap; on CPU processes
    (gloo) overlap measured no faster (bench/expert_parallel.py)."""

    def __post_init__(self) -> None:
        _check(self.ep >= 1, f"parallel.ep={self.ep} must be >= 1")
        _check(
            self.ep_overlap_chunks >= 1, f"parallel.ep_overlap_chunks={self.ep_overlap_chunks} must be >= 1"
        )
        _check(self.timeout_minutes > 0, f"parallel.timeout_minutes={self.timeout_minutes} must be > 0")


def check_zero_stage(stage, key: str) -> None:
    if stage == 3:
        raise ConfigError(
            f"{key}=3: DeepSpeed does not support ZeRO stage 3 with MoE layers; use stage 1 or 2 "
            "(optimizer states, and at 2 gradients, sharded) and parallel.ep to shard the experts"
        )
    if stage == 0:
        raise ConfigError(f"{key}=0 shards nothing: use engine=native for that, or stage 1 or 2")
    _check(
        stage in (1, 2), f"{key}={stage} is not a ZeRO stage; allowed: 1 (optimizer states), 2 (+ gradients)"
    )


@dataclass
class EngineConfig:
    name: str = "native"
    """`native` (our gradient averaging, AdamW, DCP checkpoints) or `deepspeed` (DeepSpeed's engine
    with ZeRO sharding the optimizer states; checkpoints in DeepSpeed's format)."""
    zero_stage: int = 1
    """deepspeed: 1 (optimizer states sharded), 2 (+ gradients). Stage 3 does not support MoE."""
    offload_optimizer: bool = False
    """deepspeed: keep optimizer states on the CPU and step there (ZeRO-Offload, DeepSpeed's CPU Adam)."""
    deepspeed_config: str | None = None
    """deepspeed: a DeepSpeed JSON merged over the one built from this config (bucket sizes, overlap,
    ...); batch sizes in it must agree with trainer.*, and optimizer/scheduler come from optim.*"""

    def __post_init__(self) -> None:
        _one_of("engine.name", self.name, ("native", "deepspeed"))
        check_zero_stage(self.zero_stage, "engine.zero_stage")
        if self.name == "native":
            _check(
                self.zero_stage == 1 and not self.offload_optimizer and self.deepspeed_config is None,
                "engine.zero_stage, engine.offload_optimizer and engine.deepspeed_config "
                "need engine=deepspeed",
            )


@dataclass
class WandbConfig:
    mode: str = "offline"
    """`disabled`, `offline` (written under out_dir/wandb, synced later) or `online`."""
    project: str = "moe_train"
    entity: str | None = None
    name: str | None = None
    """Run name; None uses the run directory's name."""

    def __post_init__(self) -> None:
        _one_of("logging.wandb.mode", self.mode, ("disabled", "offline", "online"))


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True
    """A tqdm bar with loss and tokens/s on rank 0."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        _check(
            self.data.seq_len <= self.model.max_seq_len,
            f"data.seq_len={self.data.seq_len} must be <= model.max_seq_len={self.model.max_seq_len}",
        )
        _check(
            self.data.seq_len > self.model.mtp.num_layers,
            f"data.seq_len={self.data.seq_len} leaves no position for multi-token prediction depth "
            f"{self.model.mtp.num_layers} (model.mtp.num_layers must be below data.seq_len)",
        )
        moe = self.model.moe
        if moe.num_experts:
            _check(
                self.parallel.ep <= moe.num_experts,
                f"parallel.ep={self.parallel.ep} is larger than model.moe.num_experts={moe.num_experts}: "
                "every expert-parallel rank needs at least one expert",
            )
            _check(
                moe.num_experts % self.parallel.ep == 0,
                f"model.moe.num_experts={moe.num_experts} must be divisible by "
                f"parallel.ep={self.parallel.ep}",
            )
            _check(
                not (moe.device_aux_loss_coef and moe.num_expert_groups == 1 and self.parallel.ep > 1),
                f"model.moe.device_aux_loss_coef={moe.device_aux_loss_coef} balances groups of experts, but "
                f"model.moe.num_expert_groups=1 makes one group: set it to parallel.ep={self.parallel.ep} "
                "(one group per device)",
            )
        else:
            _check(self.parallel.ep == 1, f"parallel.ep={self.parallel.ep} needs an MoE model (ep=1)")
        chunks = self.parallel.ep_overlap_chunks
        if chunks > 1:
            key = f"parallel.ep_overlap_chunks={chunks}"
            _check(
                self.parallel.ep > 1,
                f"{key} overlaps the expert-parallel all-to-all: it needs parallel.ep > 1",
            )
