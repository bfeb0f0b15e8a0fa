"""Expert parallelism, applied to a finished model from outside: each MoE layer keeps its rank's
shard of the experts and gets a dispatcher that moves rows to the ranks holding their experts with
all_to_all_single (docs/architecture.md draws the exchange).

Shape legend: N local tokens, D dim, E experts, El = E / ep local experts, A assignments sent,
U rows (token, rank pairs) sent, R rows received, S assignments received.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from moe_train.model.moe import LocalDispatcher, Routing, is_expert_param, moe_layers
from moe_train.model.moe.dispatch import (
    Permutation,
    SortedAssignments,
    assignments,
    count,
    permute,
    sort_by_expert,
    unpermute,
    within_capacity,
)
from moe_train.parallel.topology import Topology, named_collective


def _all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group, what: str
) -> torch.Tensor:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    with named_collective(f"expert-parallel all_to_all_single ({what})"):
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its backward is the same exchange reversed."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group, what):
        ctx.splits = (output_splits, input_splits)
        ctx.group, ctx.what = group, what
        return _all_to_all(x, output_splits, input_splits, group, what)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        grad_x = _all_to_all(grad, input_splits, output_splits, ctx.group, ctx.what + " backward")
        return grad_x, None, None, None, None


@dataclass
class AllToAllHandle:
    """The way back: the received rows' assignments and weights, the splits, the sent rows."""

    received: SortedAssignments  # over the R received rows, by local expert
    weights: torch.Tensor  # (S,) router weight of each sorted received assignment
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    sent: Permutation  # the U rows sent, over the N local tokens
    num_dropped: torch.Tensor  # ()


class AllToAllDispatcher(LocalDispatcher):
    """Sends each token once to each rank that holds any of its experts, not once per expert:

    1. the kept assignments are grouped by destination rank; a (token, rank) pair is one row, and
       each assignment names its row and its local expert (`meta`) and carries its router weight;
    2. the counts (rows and assignments per rank) are exchanged and read on the host: the one
       device-to-host sync of the layer in each direction, which no exchange of uneven splits
       avoids;
    3. then the assignments' meta and weights, and the rows;
    4. the receiving rank sorts what it received by local expert, as a single device sorts its
       tokens; combine reverses it: each received row's outputs weighted and summed, one row sent
       back per row received, and each token's returned rows summed.
    Backward runs the same exchanges reversed; the router weights' gradients come back with the
    rows'."""

    def __init__(self, num_experts: int, top_k: int, capacity_factor: float | None, group, ep: int):
        super().__init__(num_experts, top_k, capacity_factor)
        self.group = group
        self.ep = ep
        self.num_local_experts = num_experts // ep

    # Eager under torch.compile: the exchange's split sizes are read on the host, and the rows
    # received vary from step to step. The router and the experts around it still compile.
    @torch.compiler.disable
    def dispatch(
        self, x: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, torch.Tensor, AllToAllHandle]:
        ep, El = self.ep, self.num_local_experts
        token, expert = assignments(routing)  # (A,) each, in token order
        keep = within_capacity(expert, self.num_experts, self.capacity(x.shape[0]))
        rank = expert // El  # (A,) destination, then token order within each
        if keep is not None:
            rank = rank.masked_fill(~keep, ep)  # dropped: a rank of their own, sorted last, then cut
        sent = rank.argsort(stable=True)  # (A,) assignments in sending order
        rank, token = rank[sent], token[sent]
        new_row = torch.ones_like(rank, dtype=torch.bool)
        new_row[1:] = (rank[1:] != rank[:-1]) | (token[1:] != token[:-1])  # a new (token, rank) pair
        row = new_row.cumsum(0) - 1  # (A,) the row each assignment reads
        rows_per_rank = rank.new_zeros(ep + 1).scatter_add_(0, rank, new_row.long())  # (ep + 1,)
        # meta: the assignment's row within its rank's block, and its local expert
        meta = (row - (rows_per_rank.cumsum(0) - rows_per_rank)[rank]) * El + expert[sent] % El
        counts = torch.stack([rows_per_rank, count(rank, ep + 1)], dim=-1)[:ep]  # (ep, 2)
        recv_counts = _all_to_all(counts.flatten(), [2] * ep, [2] * ep, self.group, "counts").view(ep, 2)
        (send_rows, send_assignments), (recv_rows, recv_assignments) = (
            counts.T.tolist(),
            recv_counts.T.tolist(),
        )
        num_kept, num_rows = sum(send_assignments), sum(send_rows)  # read with the counts: no sync more
        sent, meta = sent[:num_kept], meta[:num_kept]
        weights = routing.weights.flatten().index_select(0, sent)  # (A kept,)
        meta_in = _all_to_all(meta, recv_assignments, send_assignments, self.group, "assignments")
        weights_in = _AllToAll.apply(
            weights, recv_assignments, send_assignments, self.group, "router weights"
        )
        # the received row each received assignment reads: its source's block, then its row there
        source = torch.arange(ep, device=x.device).repeat_interleave(
            recv_counts[:, 1], output_size=len(meta_in)
        )
        first_row = recv_counts[:, 0].cumsum(0) - recv_counts[:, 0]  # (ep,)
        row_in = first_row[source] + meta_in // El  # nondecreasing
        received = sort_by_expert(row_in, meta_in % El, sum(recv_rows), El)
        sent_rows = Permutation.of(token[new_row][:num_rows], x.shape[0])
        x_in = _AllToAll.apply(permute(x, sent_rows), recv_rows, send_rows, self.group, "tokens")  # (R, D)
        handle = AllToAllHandle(
            received, weights_in.index_select(0, received.order), send_rows, recv_rows, sent_rows,
            expert.new_tensor(expert.numel() - num_kept),
        )  # fmt: skip
        return permute(x_in, received.perm), received.counts, handle

    @torch.compiler.disable
    def combine(self, rows: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        y_in = unpermute(rows, handle.received.perm, handle.weights.to(rows.dtype))  # (R, D)
        y_sent = _AllToAll.apply(y_in, handle.send_splits, handle.recv_splits, self.group, "expert outputs")
        return unpermute(y_sent, handle.sent)  # (N, D)


def apply_expert_parallel(model: nn.Module, topology: Topology) -> None:
    """Keep this rank's expert shard of every MoE layer and install the all-to-all dispatcher.

    The model must be built identically on every rank first (same seed), so the shards together
    are exactly the single-process model. With ep=1 nothing changes: the local dispatcher stays.
    """
    ep = topology.ep
    if ep == 1:
        return
    start = topology.ep_rank
    for module in moe_layers(model):
        El = module.num_experts // ep
        experts = module.experts
        for name, full in list(experts.named_parameters(recurse=False)):  # all (E, ...)
            shard = full.detach()[start * El : (start + 1) * El].clone()
            setattr(experts, name, nn.Parameter(shard, requires_grad=full.requires_grad))
        old = module.dispatcher
        module.dispatcher = AllToAllDispatcher(
            old.num_experts, old.top_k, old.capacity_factor, topology.ep_group, ep
        )


def expert_shards_to_dtensors(state, topology: Topology, _expert: bool = False):
    """The state dict (model, or optimizer state) with each rank's expert tensors presented as the
    whole (E, ...) tensor they are shards of, DTensors on the (ep, edp) mesh over the same memory,
    so DCP stores global tensors and reloads them at any layout. A rank's block of E / ep experts is
    Shard(0) over `ep`; over `edp` it is either sharded again (FSDP: by expert, Shard(0), or along
    dim 1) or held whole by every rank (Replicate). Other values are returned as they are."""
    if topology.expert_mesh is None:
        return state
    if isinstance(state, dict):
        return {
            k: expert_shards_to_dtensors(v, topology, _expert or is_expert_param(str(k)))
            for k, v in state.items()
        }
    if not (_expert and isinstance(state, torch.Tensor) and state.ndim == 3):
        return state
    mesh = topology.expert_mesh
    if isinstance(state, DTensor):  # FSDP's shard of this rank's block (by expert or on dim 1), on edp
        shape = (state.shape[0] * topology.ep, *state.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        placements = [Shard(0), *state.placements]
        return DTensor.from_local(state.to_local(), mesh, placements, shape=shape, stride=stride)
    return DTensor.from_local(state, mesh, [Shard(0), Replicate()], run_check=False)
