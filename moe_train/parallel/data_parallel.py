"""Gradient averaging and global-norm clipping over the right process groups: dense gradients
over the world, expert gradients over their expert-data-parallel ranks, so that the update equals
one process's on the same global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import clip_grads_with_norm_

from moe_train.model.moe import is_expert_param
from moe_train.parallel.topology import Topology, named_collective

BUCKET_BYTES = 64 * 2**20


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for g in grads:
        if buckets[-1] and (
            size + g.numel() * g.element_size() > BUCKET_BYTES or g.dtype != buckets[-1][0].dtype
        ):
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += g.numel() * g.element_size()
    return [b for b in buckets if b]


class GradientSync:
    """Dense parameters are replicated on every rank: their gradients are averaged over the world.
    Expert parameters are sharded over `ep`: the all-to-all's backward already summed each expert's
    gradient over the tokens of its expert-parallel group, so they are summed over `edp` and
    divided by the world size."""

    def __init__(self, model: nn.Module, topology: Topology):
        self.topology = topology
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.dense = [p for n, p in named if not is_expert_param(n)]
        self.expert = [p for n, p in named if is_expert_param(n)]

    def _grads(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        for p in params:  # a parameter no token reached still joins the reduction, as zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in params]

    def reduce(self) -> None:
        """Average gradients after the last micro-batch's backward; a no-op on one process."""
        topo = self.topology
        if not topo.distributed:
            return
        for params, group, what in ((self.dense, None, "dense"), (self.expert, topo.edp_group, "expert")):
            for bucket in _buckets(self._grads(params)):
                flat = torch.cat([g.reshape(-1) for g in bucket])
                with named_collective(f"all_reduce ({what} gradients)"):
                    dist.all_reduce(flat, group=group)
                flat.div_(topo.world_size)
                for g, synced in zip(bucket, flat.split([g.numel() for g in bucket])):
                    g.copy_(synced.view_as(g))

    @torch.no_grad()
    def clip(self, max_norm: float) -> torch.Tensor:
        """Clip all gradients to a global norm of max_norm (0: no clipping); returns the norm. Each
        rank holds its own experts' gradients: their squared norms are summed over `ep`."""
        dense_sq = _squared_norm(self._grads(self.dense), self.topology.device)
        expert_sq = _squared_norm(self._grads(self.expert), self.topology.device)
        self.topology.all_reduce(expert_sq, group=self.topology.ep_group, what="gradient norm")
        total = (dense_sq + expert_sq).sqrt()
        if max_norm > 0:
            clip_grads_with_norm_(self.dense + self.expert, max_norm, total)
        return total


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The sum of the gradients' squared norms (fp32), summed as the squares of per-tensor norms:
    torch's get_total_norm takes the norm of the norms instead, which rounds differently."""
    if not grads:
        return torch.zeros((), device=device)
    return torch.stack([torch.linalg.vector_norm(g) for g in grads]).float().square().sum()
