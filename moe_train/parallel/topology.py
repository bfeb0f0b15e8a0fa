"""The one object that owns the process layout: the meshes of the dense weights (HSDP) and of
the experts (ep x edp), their process groups with the run's timeout, and the trainer's collectives.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from moe_train.config import ConfigError, ParallelConfig
from moe_train.config.training import V_SCHEDULES


class CollectiveFailed(RuntimeError):
    """A collective this rank waited in failed: a peer died, hung past the timeout, or broke."""


@contextlib.contextmanager
def named_collective(what: str) -> Iterator[None]:
    """A peer that died or timed out surfaces as an error naming the collective that waited."""
    try:
        yield
    except RuntimeError as e:  # gloo and NCCL errors (DistBackendError) are RuntimeErrors
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise CollectiveFailed(f"{what} failed on rank {rank}: {e}") from e


def launcher_env() -> tuple[int, int, int]:
    """(world size, rank, local rank): torchrun's, else srun tasks' (Slurm, submitit), else one process."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"]), int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        return int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0))
    return 1, 0, 0


def pick_device(kind: str, local_rank: int) -> torch.device:
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.device=cuda but no CUDA device is available; use auto or cpu")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                "start at most that many processes per node"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _subgroups(layout: torch.Tensor, timeout: timedelta) -> dist.ProcessGroup:
    """This rank's group among the rows of `layout` (every rank makes every group, as
    new_subgroups_by_enumeration needs), with the world's timeout rather than torch's default."""
    group, _ = dist.new_subgroups_by_enumeration(layout.tolist(), timeout=timeout)
    return group


@contextlib.contextmanager
def default_group_timeout(timeout: timedelta) -> Iterator[None]:
    """Groups that a library makes without a timeout argument (DeepSpeed's expert and
    data-parallel groups) get torch's module default, 30 minutes on gloo and 10 on NCCL, not the
    world's: while it makes them, that default is ours. Our own groups pass theirs."""
    c10d = dist.distributed_c10d
    saved = c10d.default_pg_timeout, c10d.default_pg_nccl_timeout
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    try:
        yield
    finally:
        c10d.default_pg_timeout, c10d.default_pg_nccl_timeout = saved


def check_layout(config: ParallelConfig, world_size: int) -> None:
    """The degrees must divide the world (ep and dp_shard the ranks of one pipeline stage): one
    line naming the value and what is allowed."""

    def allowed(n: int) -> str:
        return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)

    if world_size % config.pp:
        raise ConfigError(
            f"parallel.pp={config.pp} must divide the world size {world_size} "
            f"(world = pp x the ranks of a stage); allowed pp values: {allowed(world_size)}"
        )
    stage_ranks = world_size // config.pp
    within = (
        f"the {stage_ranks} ranks of a pipeline stage" if config.pp > 1 else f"the world size {world_size}"
    )
    if stage_ranks % config.ep:
        raise ConfigError(
            f"parallel.ep={config.ep} must divide {within} "
            f"(= expert-data-parallel x ep); allowed ep values: {allowed(stage_ranks)}"
        )
    if config.dp_shard != -1 and stage_ranks % config.dp_shard:
        raise ConfigError(
            f"parallel.dp_shard={config.dp_shard} must divide {within} "
            f"(= replicas x dp_shard); allowed: -1 (all), {allowed(stage_ranks)}"
        )


def stage_ids(pp_rank: int, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """The pipeline stages a rank runs: one; or looped (rank r: r, r + pp, ...); or in a V for the
    schedules built for it (rank r: r and 2 pp - 1 - r), as torch's schedules place them."""
    if schedule in V_SCHEDULES:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + s * pp for s in range(stages_per_rank)]


@dataclass
class Topology:
    """Every rank is data parallel (it reads its own share of each batch). Two meshes over the
    same ranks: `expert_mesh` (ep, edp), where `ep` splits each MoE layer's experts (ranks i*ep ..
    i*ep+ep-1, on one node when ep <= GPUs per node) and `edp` (expert data parallel) joins the
    ranks that hold the same experts; `dense_mesh` (dp_replicate, dp_shard), where `dp_shard`
    consecutive ranks share one copy of the dense weights and `dp_replicate` such copies exist.
    With pipeline parallelism (`pp` > 1) the world is (pp, dp): stage rank r holds ranks r*dp ..
    r*dp+dp-1, each of them data parallel and the two meshes over those ranks; `pp_group` joins
    the ranks with the same data-parallel rank across the stages, and `embedding_group` the
    first and last stage's (the embedding is on both when the last needs it: MTP, a tied head)."""

    world_size: int
    rank: int
    local_rank: int
    ep: int
    device: torch.device
    expert_mesh: DeviceMesh | None = None  # (ep, edp); None for a single process
    dense_mesh: DeviceMesh | None = None  # (dp_replicate, dp_shard); None for one rank per stage
    timeout: timedelta = timedelta(minutes=5)  # of every collective (parallel.timeout_minutes)
    pp: int = 1
    stages: tuple[int, ...] = (0,)  # the pipeline stages this rank runs
    pp_group: dist.ProcessGroup | None = None
    embedding_group: dist.ProcessGroup | None = None
    _background_group: dist.ProcessGroup | None = None

    @classmethod
    def setup(cls, config: ParallelConfig, device_kind: str = "auto") -> Topology:
        """Reads torchrun's environment, checks the layout, starts the process group and mesh."""
        world_size, rank, local_rank = launcher_env()
        check_layout(config, world_size)
        dp = world_size // config.pp
        dp_shard = dp if config.dp_shard == -1 else config.dp_shard
        device = pick_device(device_kind, local_rank)
        timeout = timedelta(minutes=config.timeout_minutes)
        topology = cls(world_size, rank, local_rank, config.ep, device, timeout=timeout, pp=config.pp)
        if config.pp > 1:
            topology.stages = tuple(
                stage_ids(rank // dp, config.pp, config.pp_stages_per_rank, config.pp_schedule)
            )
        if world_size > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(
                    backend,
                    rank=rank,
                    world_size=world_size,
                    timeout=timeout,
                    device_id=device if device.type == "cuda" else None,
                )
            stages = torch.arange(world_size).view(config.pp, dp)  # a row: one stage's ranks
            mine = stages[rank // dp]
            if config.pp > 1:
                topology.pp_group = _subgroups(stages.T, timeout)
                ends = stages[[0, -1]].T  # (dp, 2): the first and last stage's ranks
                topology.embedding_group = _subgroups(ends, timeout)
            if dp > 1:
                # (ep, edp) per stage: a column is an ep group; every rank makes every stage's groups
                experts = stages.view(config.pp, -1, config.ep).transpose(1, 2)
                groups = [
                    _subgroups(experts.transpose(1, 2).flatten(0, 1), timeout),
                    _subgroups(experts.flatten(0, 1), timeout),
                ]
                topology.expert_mesh = DeviceMesh.from_group(
                    groups, device.type, mine.view(-1, config.ep).T.contiguous(), mesh_dim_names=("ep", "edp")
                )
                dense = stages.view(config.pp, -1, dp_shard)  # (pp, dp_replicate, dp_shard)
                groups = [
                    _subgroups(dense.transpose(1, 2).flatten(0, 1), timeout),
                    _subgroups(dense.flatten(0, 1), timeout),
                ]
                topology.dense_mesh = DeviceMesh.from_group(
                    groups, device.type, mine.view(-1, dp_shard), mesh_dim_names=("dp_replicate", "dp_shard")
                )
        return topology

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_size(self) -> int:
        """The data-parallel ranks: the world, or one pipeline stage's ranks."""
        return self.world_size // self.pp

    @property
    def dp_rank(self) -> int:
        """Which share of each batch this rank reads: the same on every stage of a pipeline."""
        return self.rank % self.dp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.dp_size

    @property
    def data_parallel(self) -> bool:
        """Several ranks per stage: FSDP shards and reduces over them."""
        return self.dp_size > 1

    @property
    def ep_rank(self) -> int:
        return self.expert_mesh.get_local_rank("ep") if self.expert_mesh is not None else 0

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        return self.expert_mesh.get_group("ep") if self.expert_mesh is not None else None

    @property
    def edp_group(self) -> dist.ProcessGroup | None:
        return self.expert_mesh.get_group("edp") if self.expert_mesh is not None else None

    def all_reduce(
        self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None, what: str = "metrics"
    ) -> torch.Tensor:
        """In-place all-reduce over `group` (default: the world); a no-op on one process."""
        if self.distributed:
            with named_collective(f"all_reduce ({what})"):
                dist.all_reduce(tensor, op=op, group=group)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank (how ranks agree to stop)."""
        t = torch.tensor([float(flag)], device=self.device)
        return bool(self.all_reduce(t, op=dist.ReduceOp.MAX, what="stop flag").item())

    def barrier(self, what: str = "barrier") -> None:
        if self.distributed:
            with named_collective(what):
                dist.barrier()

    def background_group(self) -> dist.ProcessGroup | None:
        """A gloo group of the whole world for the collectives of a background thread (checkpoint
        writes), so that they never interleave with the training's own on the default group; None
        without a process group. Every rank makes the first call at the same point: it creates it."""
        if not dist.is_initialized():
            return None
        if self._background_group is None:
            self._background_group = dist.new_group(backend="gloo", timeout=self.timeout)
        return self._background_group

    def close(self) -> None:
        if dist.is_initialized():  # also the world of one engine=deepspeed makes on one process
            dist.destroy_process_group()
