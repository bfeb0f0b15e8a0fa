"""Gradient averaging and global-norm clipping over the right groups.

Dense parameters are replicated on every rank: their gradients are averaged over the world.
Expert parameters are sharded over the `ep` axis: the all-to-all backward already summed each
expert's gradient over the tokens of its expert-parallel group, so they are summed over the `edp`
axis and divided by the world size. Either way the update equals a single process's on the
same global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe_train.parallel.topology import Topology, named_collective

BUCKET_BYTES = 64 * 2**20


def is_expert_param(name: str) -> bool:
    return ".experts." in name


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
                flat = _flatten_dense_tensors(bucket)
                with named_collective(f"all_reduce ({what} gradients)"):
                    dist.all_reduce(flat, group=group)
                flat.div_(topo.world_size)
                for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    g.copy_(synced)

    @torch.no_grad()
    def clip(self, max_norm: float) -> torch.Tensor:
        """Clip all gradients to a global norm of max_norm (0: no clipping); returns the norm."""
        dense, expert = self._grads(self.dense), self._grads(self.expert)
        device = self.topology.device
        sq = torch.zeros((), device=device)
        expert_sq = torch.zeros((), device=device)
        if dense:
            sq += torch.stack(torch._foreach_norm(dense)).float().square().sum()
        if expert:
            expert_sq += torch.stack(torch._foreach_norm(expert)).float().square().sum()
        self.topology.all_reduce(expert_sq, group=self.topology.ep_group, what="gradient norm")
        total = (sq + expert_sq).sqrt()
        if max_norm > 0:
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(dense + expert, coef)
        return total
