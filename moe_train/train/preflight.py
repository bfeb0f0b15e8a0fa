"""What a run checks before it starts anything: every rank on its own, before a process group
exists or Hydra writes its record, so that a mistake is one line within seconds."""

from __future__ import annotations

from pathlib import Path

import torch

from moe_train.config import Config, ConfigError, TrainerConfig
from moe_train.parallel.pipeline import check_micro_batches
from moe_train.parallel.topology import check_layout
from moe_train.train.checkpoint import CheckpointMismatch, check_run_folders, load_config, resolve_checkpoint
from moe_train.train.checkpoint.run_dir import complete_checkpoints, refuse_a_run_in_use
from moe_train.train.trainer import batch_layout


def preflight(config: Config, world_size: int, main_rank: bool) -> None:
    """The layout and batch against the world size, the folders the run writes, and on the main
    rank a run already using trainer.out_dir and a checkpoint to resume of the other engine."""
    check_layout(config.parallel, world_size)
    data_parallel = world_size // config.parallel.pp
    t = batch_layout(config.trainer, data_parallel)
    check_micro_batches(config.parallel, t.global_batch_size // (t.micro_batch_size * data_parallel))
    check_compiler(config.trainer)
    check_run_folders(config)
    if not main_rank:
        return
    out_dir = Path(config.trainer.out_dir).expanduser()
    refuse_a_run_in_use(out_dir)
    resume = config.trainer.resume
    if resume == "none":
        return
    found = (
        complete_checkpoints(out_dir / "checkpoints") if resume == "auto" else [resolve_checkpoint(resume)]
    )
    if found and (found[-1] / "config.yaml").is_file():
        written_by = load_config(found[-1]).engine.name
        if written_by != config.engine.name:  # before DeepSpeed's set-up and op builds
            raise CheckpointMismatch(
                f"checkpoint {found[-1]} was written by engine={written_by} and this run uses "
                f"engine={config.engine.name}; resume with engine={written_by}, "
                f"or start from its weights with trainer.init_from={found[-1]}"
            )


def check_compiler(trainer: TrainerConfig) -> None:
    """trainer.compile (on by default on a GPU) needs what torch.compile generates code with: a C++
    compiler for the CPU, Triton for a GPU. Without them the first step would fail deep inside
    the compiler."""
    on_gpu = trainer.device == "cuda" or (trainer.device == "auto" and torch.cuda.is_available())
    if not (trainer.compile or (trainer.compile is None and on_gpu)):
        return
    if on_gpu:
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError(
                "trainer.compile (on by default on a GPU) needs Triton and it is not installed "
                "(pip install triton); trainer.compile=false runs without it"
            )
        return
    from torch._inductor import config as inductor_config
    from torch._inductor.cpp_builder import cpp_compiler_search
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        cpp_compiler_search(inductor_config.cpp.cxx)
    except InvalidCxxCompiler:
        tried = ", ".join(c for c in inductor_config.cpp.cxx if c)
        raise ConfigError(
            f"trainer.compile=true needs a C++ compiler on the CPU and none runs (tried {tried}; "
            "install one or name it in CXX); trainer.compile=false runs without it"
        ) from None
