"""The one object that owns the process layout: world = edp x ep, as a 2-D DeviceMesh.

Mesh axes: `ep` splits each MoE layer's experts (ranks i*ep .. i*ep+ep-1 form one expert-parallel
group, so they sit on one node when ep <= GPUs per node); `edp` (expert data parallel) joins the
ranks that hold the same expert shard. Dense parameters are replicated on every rank, so for them
the whole world is data parallel, and every rank reads its own share of each global batch.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moe_train.config import ConfigError, ParallelConfig


@contextlib.contextmanager
def named_collective(what: str) -> Iterator[None]:
    """A peer that died or timed out surfaces as an error naming the collective that waited."""
    try:
        yield
    except RuntimeError as e:  # gloo and NCCL errors (DistBackendError) are RuntimeErrors
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise RuntimeError(f"{what} failed on rank {rank}: {e}") from e


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


def retain_freed_memory() -> None:
    """CPU training: serve every allocation from glibc's heap and keep what is freed there.

    glibc hands each allocation above 32 MB (its largest mmap threshold) to mmap and unmaps it on
    free, so a training step page-faults its large activations and gradients in again every time:
    11 ms per 33 MB tensor on the 2-core machines we measure on, 15-20 % of a mixtral_tiny step
    (bench/train_e2e.py). With mmap and trimming off, freed blocks are reused; resident memory
    stays at the step's peak. A no-op where the C library has no mallopt (not glibc).
    """
    mallopt = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallopt", None)
    if mallopt is not None:
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h
        mallopt(M_MMAP_MAX, 0)
        mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def _default_timeout_of_later_groups(timeout: timedelta) -> None:
    """Groups made after the world's (the mesh's edp and ep subgroups, DeepSpeed's expert and
    data-parallel groups, all through dist.new_group without a timeout) get torch's module-level
    default, 30 minutes on gloo and 10 on NCCL, not the world's: a rank waiting on a hung peer in
    one of them would outwait parallel.timeout_minutes. Make that default ours."""
    dist.distributed_c10d.default_pg_timeout = timeout
    dist.distributed_c10d.default_pg_nccl_timeout = timeout


@dataclass
class Topology:
    world_size: int
    rank: int
    local_rank: int
    ep: int
    device: torch.device
    mesh: DeviceMesh | None  # None for a single process
    timeout: timedelta = timedelta(minutes=5)  # of every collective (parallel.timeout_minutes)
    _background_group: dist.ProcessGroup | None = None

    @classmethod
    def setup(cls, config: ParallelConfig, device_kind: str = "auto") -> Topology:
        """Reads torchrun's environment, checks the layout, starts the process group and mesh."""
        world_size, rank, local_rank = launcher_env()
        if world_size % config.ep:
            raise ConfigError(
                f"parallel.ep={config.ep} must divide the world size {world_size} "
                f"(world = expert-data-parallel x ep); allowed ep values: "
                f"{', '.join(str(d) for d in range(1, world_size + 1) if world_size % d == 0)}"
            )
        device = pick_device(device_kind, local_rank)
        if device.type == "cpu":
            retain_freed_memory()
        mesh = None
        if world_size > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(
                    backend,
                    rank=rank,
                    world_size=world_size,
                    timeout=timedelta(minutes=config.timeout_minutes),
                    device_id=device if device.type == "cuda" else None,
                )
            _default_timeout_of_later_groups(timedelta(minutes=config.timeout_minutes))
            mesh = init_device_mesh(
                device.type, (world_size // config.ep, config.ep), mesh_dim_names=("edp", "ep")
            )
        return cls(
            world_size, rank, local_rank, config.ep, device, mesh, timedelta(minutes=config.timeout_minutes)
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def ep_rank(self) -> int:
        return self.mesh.get_local_rank("ep") if self.mesh is not None else 0

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        return self.mesh.get_group("ep") if self.mesh is not None else None

    @property
    def edp_group(self) -> dist.ProcessGroup | None:
        return self.mesh.get_group("edp") if self.mesh is not None else None

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
