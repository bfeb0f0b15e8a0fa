"""The typed configuration tree that Hydra composes into (`moe_train/tools/hydra_config.py`), with
validation: every check raises `ConfigError` naming the key. Nothing here imports hydra. The root
`Config` lives here because its checks span the model and the run's sections."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_train.config.checks import ConfigError, check, first_line
from moe_train.config.model import MLAConfig, ModelConfig, MoEConfig, MTPConfig, RopeScalingConfig
from moe_train.config.training import (
    ZERO_BUBBLE_SCHEDULES,
    DataConfig,
    EngineConfig,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    TrainerConfig,
    WandbConfig,
    check_zero_stage,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "LoggingConfig",
    "MLAConfig",
    "MTPConfig",
    "ModelConfig",
    "MoEConfig",
    "OptimConfig",
    "ParallelConfig",
    "RopeScalingConfig",
    "TrainerConfig",
    "WandbConfig",
    "check_zero_stage",
    "first_line",
]


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
        check(
            self.data.seq_len <= self.model.max_seq_len,
            f"data.seq_len={self.data.seq_len} must be <= model.max_seq_len={self.model.max_seq_len}",
        )
        check(
            self.data.seq_len > self.model.mtp.num_layers,
            f"data.seq_len={self.data.seq_len} leaves no position for multi-token prediction depth "
            f"{self.model.mtp.num_layers} (model.mtp.num_layers must be below data.seq_len)",
        )
        moe = self.model.moe
        if moe.num_experts:
            check(
                self.parallel.ep <= moe.num_experts,
                f"parallel.ep={self.parallel.ep} is larger than model.moe.num_experts={moe.num_experts}: "
                "every expert-parallel rank needs at least one expert",
            )
            check(
                moe.num_experts % self.parallel.ep == 0,
                f"model.moe.num_experts={moe.num_experts} must be divisible by "
                f"parallel.ep={self.parallel.ep}",
            )
            check(
                not (moe.device_aux_loss_coef and moe.num_expert_groups == 1 and self.parallel.ep > 1),
                f"model.moe.device_aux_loss_coef={moe.device_aux_loss_coef} balances groups of experts, but "
                f"model.moe.num_expert_groups=1 makes one group: set it to parallel.ep={self.parallel.ep} "
                "(one group per device)",
            )
        else:
            check(self.parallel.ep == 1, f"parallel.ep={self.parallel.ep} needs an MoE model (ep=1)")
        self._check_pipeline()
        if self.engine.name == "deepspeed":
            p = self.parallel
            check(
                p.dp_shard == -1 and p.reshard_after_forward and p.reduce_dtype == "fp32",
                "parallel.dp_shard, parallel.reshard_after_forward and parallel.reduce_dtype set FSDP2, "
                "which is engine=native's: engine=deepspeed shards with engine.zero_stage",
            )

    def _check_pipeline(self) -> None:
        p, layers = self.parallel, self.model.num_layers
        stages = p.pp * p.pp_stages_per_rank
        if p.pp_layers is not None:
            check(
                len(p.pp_layers) == stages and sum(p.pp_layers) == layers,
                f"parallel.pp_layers={list(p.pp_layers)} must list {stages} stages (parallel.pp x "
                f"parallel.pp_stages_per_rank) summing to model.num_layers={layers}",
            )
        if p.pp == 1:
            return
        check(
            self.engine.name == "native",
            f"parallel.pp={p.pp} needs engine=native (FSDP2 within each stage); engine=deepspeed runs pp=1",
        )
        check(
            stages <= layers,
            f"parallel.pp={p.pp} x parallel.pp_stages_per_rank={p.pp_stages_per_rank} = {stages} "
            f"stages is more than model.num_layers={layers}: every stage needs a layer",
        )
        check(
            not (self.trainer.compile and p.pp_schedule in ZERO_BUBBLE_SCHEDULES),
            f"trainer.compile=true cannot run with parallel.pp_schedule={p.pp_schedule}: the zero-bubble "
            "schedules (InterleavedZeroBubble, ZBVZeroBubble, DualPipeV) split each block's backward, "
            "which a compiled block cannot; use trainer.compile=false, or GPipe, 1F1B, Interleaved1F1B "
            "or LoopedBFS",
        )
