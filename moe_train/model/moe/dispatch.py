"""Dispatch and combine: the contract every dispatcher keeps (`Dispatcher`), the single-device one,
and the permutation primitives both it and the expert-parallel one (moe_train/parallel) build on.

Every shape on one device is static (A = N * k rows whatever the routing, counts as tensors), so
that the whole MoE block compiles as one graph with no device-to-host synchronisation.

Shape legend: N tokens, D model dim, E experts (El local to this rank), k top-k, A assignments
(N * k), S rows the experts compute, R source rows of a permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from moe_train.model.moe.router import Routing, count

__all__ = [
    "DispatchHandle",
    "Dispatcher",
    "LocalDispatcher",
    "Permutation",
    "SortedAssignments",
    "assignments",
    "count",
    "permute",
    "sort_by_expert",
    "unpermute",
    "within_capacity",
]


class DispatchHandle(Protocol):
    """What a dispatcher keeps between dispatch and combine."""

    num_dropped: torch.Tensor  # () int64: assignments left out by the capacity limit


class Dispatcher(Protocol):
    """How an MoE layer's tokens reach its experts and come back (Megatron-Core's token
    dispatcher; torchtitan's _token_dispatch / _token_combine).

    dispatch: x (N, D) and the routing -> rows (S', D) grouped by local expert in expert order,
    counts (El,) rows per local expert, and a handle. The experts map rows to rows.
    combine: rows (S', D) and the handle -> (N, D), each token's expert outputs weighted by its
    router weights and summed. `capacity_factor` None routes every assignment (dropless); with one,
    the assignments over an expert's capacity add nothing to the output."""

    capacity_factor: float | None

    def dispatch(
        self, x: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]: ...

    def combine(self, rows: torch.Tensor, handle: DispatchHandle) -> torch.Tensor: ...


@dataclass
class Permutation:
    """M rows taken from R source rows, a source row possibly taken several times (a token's k
    assignments): row j is source row `index[j]`. `members` lists the rows source by source and
    `offsets` says where each source's list starts, which turns the way back into one
    embedding_bag: a gather, not a scatter-add."""

    index: torch.Tensor  # (M,) source row of each row
    members: torch.Tensor  # (M,) the rows, grouped by source row
    offsets: torch.Tensor  # (R,) start of each source row's list in `members`

    @staticmethod
    def of(index: torch.Tensor, num_sources: int, members: torch.Tensor | None = None) -> Permutation:
        """`members`, where the caller has it already: any order of the rows grouped by source."""
        sizes = count(index, num_sources)
        members = index.argsort(stable=True) if members is None else members
        return Permutation(index, members, sizes.cumsum(0) - sizes)


def _sum_by_source(
    rows: torch.Tensor, members: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """(M, D) rows, optionally weighted (M,) -> (R, D): each source row's rows summed.
    embedding_bag is the gather, the weighting and the sum in one kernel, with no (M, D)
    intermediate (bench/moe_layer.py measures it against index_add)."""
    per_sample = None if weights is None else weights.index_select(0, members)
    return F.embedding_bag(members, rows, offsets, mode="sum", per_sample_weights=per_sample)


class _Permute(torch.autograd.Function):
    """x (R, D) -> x[index] (M, D); backward: each source row's gradients summed (a gather)."""

    @staticmethod
    def forward(ctx, x, index, members, offsets):
        ctx.save_for_backward(members, offsets)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad_rows):
        members, offsets = ctx.saved_tensors
        return _sum_by_source(grad_rows.contiguous(), members, offsets, None), None, None, None


class _Unpermute(torch.autograd.Function):
    """rows (M, D) and weights (M,) or None -> (R, D): each source row's rows, weighted, summed.

    Backward: row j's gradient is w_j * grad_out[index_j] (a gather), w_j's the dot product of
    grad_out[index_j] with row j. Weighting here rather than on the experts' hidden activation
    leaves the experts' elementwise work as a dense SwiGLU's."""

    @staticmethod
    def forward(ctx, rows, weights, index, members, offsets):
        ctx.save_for_backward(rows, weights, index)
        return _sum_by_source(rows, members, offsets, weights)

    @staticmethod
    def backward(ctx, grad_out):
        rows, weights, index = ctx.saved_tensors
        grad_rows = grad_out.index_select(0, index)  # (M, D)
        if weights is None:
            return grad_rows, None, None, None, None
        grad_weights = torch.linalg.vecdot(grad_rows, rows) if ctx.needs_input_grad[1] else None
        return grad_rows.mul_(weights.unsqueeze(-1)), grad_weights, None, None, None


def permute(x: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """x (R, D) -> (M, D): the source row of each of the permutation's rows."""
    return _Permute.apply(x, perm.index, perm.members, perm.offsets)


def unpermute(rows: torch.Tensor, perm: Permutation, weights: torch.Tensor | None = None) -> torch.Tensor:
    """rows (M, D), optionally weighted (M,) -> (R, D): the adjoint of permute."""
    return _Unpermute.apply(rows, weights, perm.index, perm.members, perm.offsets)


@dataclass
class SortedAssignments:
    """Assignments of source rows to experts, sorted by expert: what the experts compute, and the
    way back. Sorted assignment i reads source row `perm.index[i]`."""

    perm: Permutation  # the source rows, and each row's sorted assignments
    order: torch.Tensor  # (A,) the assignment at each sorted position
    counts: torch.Tensor  # (E,) sorted assignments per expert


def assignments(routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat (token, expert) assignments in token order: token (A,) and expert (A,)."""
    num_tokens, k = routing.experts.shape
    expert = routing.experts.flatten()
    return torch.arange(num_tokens, device=expert.device).repeat_interleave(k), expert


def within_capacity(
    expert: torch.Tensor, num_experts: int, capacity: int | None, order: torch.Tensor | None = None
) -> torch.Tensor | None:
    """(A,) bool: each expert keeps its first `capacity` assignments, in assignment order (token
    order); None without a limit. `order`: expert.argsort(stable=True), where the caller has it."""
    if capacity is None:
        return None
    order = expert.argsort(stable=True) if order is None else order
    counts = count(expert, num_experts)
    rank_in_expert = torch.empty_like(order)
    rank_in_expert[order] = (
        torch.arange(order.numel(), device=order.device) - (counts.cumsum(0) - counts)[expert[order]]
    )
    return rank_in_expert < capacity


def sort_by_expert(
    row: torch.Tensor, expert: torch.Tensor, num_rows: int, num_experts: int
) -> SortedAssignments:
    """A assignments (row (A,) in nondecreasing order, expert (A,)) stably sorted by expert."""
    order = expert.argsort(stable=True)  # (A,)
    # sorted positions listed by assignment, so grouped by row: the members, no second sort
    position = torch.empty_like(expert)
    position[order] = torch.arange(order.numel(), device=order.device)
    perm = Permutation.of(row.index_select(0, order), num_rows, position)
    return SortedAssignments(perm, order, count(expert, num_experts))


@dataclass
class LocalHandle:
    sorted: SortedAssignments
    weights: torch.Tensor  # (A,) the router weight of each sorted assignment, 0 where dropped
    num_dropped: torch.Tensor  # ()


class LocalDispatcher:
    """Single device: the N * k assignments sorted by expert. With a capacity factor each expert
    keeps its first `capacity` assignments in token order; the rest are still computed (the rows
    keep a static shape) but weighted 0, so they add nothing to the output or to any gradient."""

    def __init__(self, num_experts: int, top_k: int, capacity_factor: float | None = None):
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def dispatch(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, LocalHandle]:
        token, expert = assignments(routing)
        batch = sort_by_expert(token, expert, x.shape[0], self.num_experts)
        weights = routing.weights.flatten()  # (A,)
        keep = within_capacity(expert, self.num_experts, self.capacity(x.shape[0]), batch.order)
        if keep is None:
            num_dropped = expert.new_zeros(())
        else:
            weights, num_dropped = weights.masked_fill(~keep, 0.0), (~keep).sum()
        handle = LocalHandle(batch, weights.index_select(0, batch.order), num_dropped)
        return permute(x, batch.perm), batch.counts, handle

    def combine(self, rows: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        return unpermute(rows, handle.sorted.perm, handle.weights.to(rows.dtype))
