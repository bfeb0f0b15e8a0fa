"""The configuration of a training run around the model: data, optimizer and schedule, trainer,
parallelism, engine (native or DeepSpeed) and logging. Each check names its key."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from moe_train.config.checks import ConfigError, at_least, check, in_range, is_finite, one_of, positive


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
    document_mask: bool = False
    """Each token attends only to the earlier tokens of its own document in the packed sequence
    (documents end at the tokenizer's end-of-document token; the token belongs to the document it
    ends), in training, evaluation and generation; the multi-token prediction depths too. Off:
    the tail of whatever document came before is in view (megatron's reset_attention_mask=False)."""
    reset_positions: bool = False
    """Rotary positions restart at 0 at each document's first token (megatron's reset_position_ids)."""
    eod_mask_loss: bool = False
    """Leave out of the training loss each prediction whose target lies in the next document: the
    token after an end-of-document token (and, for multi-token prediction, every prediction across
    one). Validation still counts every token, so nats/byte compare across the options."""

    def __post_init__(self) -> None:
        one_of("data.name", self.name, ("stdlib", "stdlib_bytes", "indexed"))
        positive("data.seq_len", self.seq_len)
        in_range("data.vocab_size", self.vocab_size, 256, low_open=True, note="a byte-level BPE")
        weights = _split_weights(self.split)
        check(
            len(weights) == 3 and all(is_finite(w) and w >= 0 for w in weights) and weights[1] > 0,
            f"data.split={self.split!r} must be three finite weights >= 0, train,validation,test, with "
            "validation > 0 (e.g. 98,2,0)",
        )
        if self.name == "indexed":
            check(
                bool(self.prefixes), "data.prefixes must list at least one prepared corpus for data=indexed"
            )
        if self.weights is not None:
            check(
                len(self.weights) == len(self.prefixes),
                f"data.weights has {len(self.weights)} entries but data.prefixes has {len(self.prefixes)}",
            )
            check(
                all(is_finite(w) and w > 0 for w in self.weights),
                f"data.weights={self.weights} must all be finite numbers > 0",
            )

    @property
    def separates_documents(self) -> bool:
        """Whether any option needs the end-of-document tokens."""
        return self.document_mask or self.reset_positions or self.eod_mask_loss

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
        finite = is_finite(self.lr)
        check(
            self.lr > 0 and finite,
            f"optim.lr={self.lr} must be a positive number" + ("" if finite else " (a finite one)"),
        )
        one_of("optim.schedule", self.schedule, ("cosine", "linear", "wsd"))
        in_range("optim.min_lr_ratio", self.min_lr_ratio, 0, 1)
        at_least("optim.warmup_steps", self.warmup_steps, 0)
        in_range("optim.decay_fraction", self.decay_fraction, 0, 1)
        at_least("optim.weight_decay", self.weight_decay, 0)
        in_range("optim.beta1", self.beta1, 0, 1, high_open=True)
        in_range("optim.beta2", self.beta2, 0, 1, high_open=True)
        positive("optim.eps", self.eps)
        at_least("optim.grad_clip", self.grad_clip, 0, "0 disables clipping")


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
    compile: bool | None = None
    """torch.compile each transformer block whole (with expert parallelism, all but its dispatch
    and combine). null: on a GPU, where compiled steps are faster; off on a CPU, where they are
    2-11 % faster at the tiny presets but the first step's compilation (35-80 s on 2 cores) costs
    more than a few hundred steps save (docs/architecture.md has the figures)."""
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
        for key in ("max_steps", "global_batch_size", "eval_batches", "log_every"):
            positive(f"trainer.{key}", getattr(self, key))
        if self.micro_batch_size is not None:
            positive("trainer.micro_batch_size", self.micro_batch_size, "or null for no accumulation")
        at_least("trainer.eval_every", self.eval_every, 0, "0 disables evaluation")
        at_least("trainer.ckpt_every", self.ckpt_every, 0, "0 saves only at the end")
        for key in ("num_samples", "sample_tokens"):
            at_least(f"trainer.{key}", getattr(self, key), 0)
        at_least("trainer.keep_last", self.keep_last, 1)
        check(0 <= self.seed < 2**32, f"trainer.seed={self.seed} must be between 0 and 2**32 - 1")
        check(
            bool(self.out_dir.strip()),
            "trainer.out_dir is empty: name the run directory (metrics and checkpoints go there), "
            "e.g. trainer.out_dir=runs/my_run",
        )
        self.out_dir = os.path.expanduser(self.out_dir)
        check(
            self.micro_batch_size is None or self.global_batch_size % self.micro_batch_size == 0,
            f"trainer.global_batch_size={self.global_batch_size} must be divisible by "
            f"trainer.micro_batch_size={self.micro_batch_size}",
        )
        check(bool(self.resume), "trainer.resume must be `auto`, `none` or a checkpoint path")
        one_of("trainer.device", self.device, ("auto", "cpu", "cuda"))
        one_of("trainer.precision", self.precision, ("auto", "fp32", "bf16"))
        if self.exit_after_steps is not None:
            positive("trainer.exit_after_steps", self.exit_after_steps, "or null for no limit")
        if self.exit_after_minutes is not None:
            positive("trainer.exit_after_minutes", self.exit_after_minutes, "or null for no limit")


# torch.distributed.pipelining's schedules, by the names get_schedule_class knows them
SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")
ZERO_BUBBLE_SCHEDULES = ("InterleavedZeroBubble", *V_SCHEDULES)  # split backward: no torch.compile
PIPELINE_SCHEDULES = (
    *SINGLE_STAGE_SCHEDULES,
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    *V_SCHEDULES,
)


@dataclass
class ParallelConfig:
    ep: int = 1
    """Expert-parallel degree: each MoE layer's experts are split over this many ranks."""
    dp_shard: int = -1
    """engine=native on several processes (FSDP2): how many ranks one shard group of the dense
    weights spans; the world is dp_shard x replicas of it (HSDP when there are several). -1: the
    whole world (fully sharded). Each rank's experts are sharded over its expert-data-parallel
    ranks (world / ep) whatever this is."""
    reshard_after_forward: bool = True
    """engine=native on several processes: free each block's gathered weights after its forward
    and gather them again in backward (less memory); false keeps them until backward (less
    communication)."""
    reduce_dtype: str = "fp32"
    """The dtype gradients are reduced in under trainer.precision=bf16 (engine=native, several
    processes): fp32 (exact sums of bf16 gradients) or bf16 (half the bytes)."""
    timeout_minutes: float = 5.0
    """A collective that waits longer than this fails with an error naming it (no silent hang)."""
    pp: int = 1
    """Pipeline-parallel degree (engine=native): the blocks are cut into stages of consecutive
    layers over this many ranks; the world is pp x the data-parallel ranks of each stage (which
    ep and dp_shard divide). The embedding is on the first stage; the final norm, head, loss and
    multi-token prediction depths on the last."""
    pp_schedule: str = "1F1B"
    """torch.distributed.pipelining's schedule: GPipe or 1F1B (one stage per rank); Interleaved1F1B,
    LoopedBFS or InterleavedZeroBubble (stages looped over the ranks); ZBVZeroBubble or DualPipeV
    (two stages per rank in a V). The step's micro-batches are the pipeline's."""
    pp_stages_per_rank: int | None = None
    """Stages each rank holds; null: 1 for GPipe and 1F1B, 2 for the others."""
    pp_layers: list[int] | None = None
    """Layers of each stage in order (pp x stages per rank numbers, summing to model.num_layers);
    null: as even as possible, the remainder to the middle stages (the first stage also embeds,
    the last also carries the head and multi-token prediction)."""

    def __post_init__(self) -> None:
        at_least("parallel.ep", self.ep, 1)
        at_least("parallel.pp", self.pp, 1)
        one_of("parallel.pp_schedule", self.pp_schedule, PIPELINE_SCHEDULES)
        if self.pp_stages_per_rank is None:
            self.pp_stages_per_rank = 1 if self.pp_schedule in SINGLE_STAGE_SCHEDULES else 2
        at_least("parallel.pp_stages_per_rank", self.pp_stages_per_rank, 1)
        if self.pp_schedule in SINGLE_STAGE_SCHEDULES:
            check(
                self.pp_stages_per_rank == 1,
                f"parallel.pp_schedule={self.pp_schedule} runs one stage per rank, not "
                f"parallel.pp_stages_per_rank={self.pp_stages_per_rank}; for several use "
                f"{', '.join(s for s in PIPELINE_SCHEDULES if s not in SINGLE_STAGE_SCHEDULES)}",
            )
        if self.pp_schedule in V_SCHEDULES:
            check(
                self.pp_stages_per_rank == 2,
                f"parallel.pp_schedule={self.pp_schedule} needs exactly 2 stages per rank, not "
                f"parallel.pp_stages_per_rank={self.pp_stages_per_rank}",
            )
        if self.pp_layers is not None:
            check(
                all(is_finite(n) and n >= 1 for n in self.pp_layers),
                f"parallel.pp_layers={list(self.pp_layers)}: every stage needs at least one layer",
            )
        check(
            self.dp_shard == -1 or (is_finite(self.dp_shard) and self.dp_shard >= 1),
            f"parallel.dp_shard={self.dp_shard} must be >= 1, or -1 for the whole world",
        )
        one_of("parallel.reduce_dtype", self.reduce_dtype, ("fp32", "bf16"))
        positive("parallel.timeout_minutes", self.timeout_minutes)


def check_zero_stage(stage: object, key: str) -> None:
    """engine.zero_stage, or a deepspeed_config JSON's zero_optimization.stage, must be 1 or 2."""
    if stage == 3:
        raise ConfigError(
            f"{key}=3: DeepSpeed does not support ZeRO stage 3 with MoE layers; use stage 1 or 2 "
            "(optimizer states, and at 2 gradients, sharded) and parallel.ep to shard the experts"
        )
    if stage == 0:
        raise ConfigError(f"{key}=0 shards nothing: use engine=native for that, or stage 1 or 2")
    check(
        stage in (1, 2), f"{key}={stage} is not a ZeRO stage; allowed: 1 (optimizer states), 2 (+ gradients)"
    )


@dataclass
class EngineConfig:
    name: str = "native"
    """`native` (FSDP2 sharding weights, gradients and AdamW's states over the ranks; DCP
    checkpoints) or `deepspeed` (DeepSpeed's engine with ZeRO-1/2 sharding the optimizer states;
    the same DCP checkpoints)."""
    zero_stage: int = 1
    """deepspeed: 1 (optimizer states sharded), 2 (+ gradients). Stage 3 does not support MoE."""
    offload_optimizer: bool = False
    """deepspeed: keep optimizer states on the CPU and step there (ZeRO-Offload, DeepSpeed's CPU Adam)."""
    deepspeed_config: str | None = None
    """deepspeed: a DeepSpeed JSON merged over the one built from this config (bucket sizes, overlap,
    ...); batch sizes in it must agree with trainer.*, and optimizer/scheduler come from optim.*"""

    def __post_init__(self) -> None:
        one_of("engine.name", self.name, ("native", "deepspeed"))
        check_zero_stage(self.zero_stage, "engine.zero_stage")
        if self.name == "native":
            check(
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
        one_of("logging.wandb.mode", self.mode, ("disabled", "offline", "online"))


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True
    """A tqdm bar with loss and tokens/s on rank 0."""
