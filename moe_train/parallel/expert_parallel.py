"""Expert parallelism, applied to a finished model from outside: shard experts, install all-to-all.

Each MoE layer's stacked expert weights (E, ...) are cut on dim 0 into `ep` shards; rank i of an
expert-parallel group keeps experts [i * E/ep, (i + 1) * E/ep). Its dispatcher then
1. routes and sorts the local tokens by global expert id, which also groups them by owner rank,
2. exchanges per-expert token counts (all_to_all_single, equal splits),
3. sends each token to its expert's rank (all_to_all_single, uneven splits),
4. regroups what it received by local expert, so every local expert has one contiguous slice,
and `combine` undoes 4, 3 and 1 in reverse order, the router weights applied on the tokens' own
rank (LocalDispatcher.unpermute). Backward runs the same exchanges reversed.

With `parallel.ep_overlap_chunks` = C > 1 the tokens are cut into C chunks and the dispatcher runs
the experts itself, between the exchanges (`_OverlappedExperts`): every chunk's rows are posted at
once (async all-to-all), the experts compute chunk c while later chunks are still travelling, and
chunk c's outputs travel back while chunk c + 1 computes; backward overlaps the same way.

Shape legend: N local tokens, D dim, E experts, El = E / ep local experts, R rows received.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from moe_train.model.moe import DispatchState, LocalDispatcher, MoE, Routing
from moe_train.parallel.topology import Topology, named_collective


class _Posted:
    """An all_to_all_single in flight (async_op=True) into `out`; wait() names it if a peer fails."""

    def __init__(self, out: torch.Tensor, x: torch.Tensor, output_splits, input_splits, group, what: str):
        self.out, self.what = out, f"expert-parallel all_to_all_single ({what})"
        with named_collective(self.what):
            self.work = dist.all_to_all_single(
                out, x, output_splits, input_splits, group=group, async_op=True
            )

    def wait(self) -> torch.Tensor:
        with named_collective(self.what):
            self.work.wait()
        return self.out


def _post_rows(rows: torch.Tensor, output_splits, input_splits, group, what: str) -> _Posted:
    out = rows.new_empty((sum(output_splits), *rows.shape[1:]))
    return _Posted(out, rows.contiguous(), output_splits, input_splits, group, what)


def _all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group, what: str
) -> torch.Tensor:
    return _post_rows(x, output_splits, input_splits, group, what).wait()


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
class ExpertParallelState:
    local: DispatchState  # undoes the sort by global expert
    regroup: torch.Tensor  # (R,) received row of each row in local-expert order
    ungroup: torch.Tensor  # (R,) the inverse permutation: row in local-expert order of each received row
    send_splits: list[int]  # rows sent to each rank of the group
    recv_splits: list[int]  # rows received from each rank of the group

    @property
    def num_dropped(self) -> int:
        return self.local.num_dropped


class _PermuteRows(torch.autograd.Function):
    """rows[perm] with its inverse permutation as the backward (a gather, not a scatter-add)."""

    @staticmethod
    def forward(ctx, rows, perm, inverse):
        ctx.save_for_backward(perm, inverse)
        return rows.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        perm, inverse = ctx.saved_tensors
        return _PermuteRows.apply(grad.contiguous(), inverse, perm), None, None


def _regroup_order(recv_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Received rows come ordered (source rank, local expert), recv_counts (ep, El) of each; the
    experts need them ordered (local expert, source). Returns that permutation and its inverse."""
    ep, El = recv_counts.shape
    local_expert = torch.arange(El, device=recv_counts.device).repeat(ep)  # (ep * El,)
    row_expert = local_expert.repeat_interleave(recv_counts.flatten())  # (R,)
    regroup = row_expert.argsort(stable=True)
    ungroup = torch.empty_like(regroup)
    ungroup[regroup] = torch.arange(regroup.numel(), device=regroup.device)
    return regroup, ungroup


@dataclass
class _Chunk:
    """One chunk's exchange in the overlapped path (R rows received)."""

    send_splits: list[int]  # rows sent to each rank of the group
    recv_splits: list[int]  # rows received from each rank
    tokens_per_local_expert: torch.Tensor  # (El,)
    regroup: torch.Tensor  # (R,) received row of each row in local-expert order
    ungroup: torch.Tensor  # (R,) its inverse


class _OverlappedExperts(torch.autograd.Function):
    """The experts between the two exchanges, chunk by chunk, with the exchanges in flight.

    rows (S, D), grouped by (chunk, destination rank) -> the experts' outputs (S, D) in the same
    order. All chunks' rows are posted first; then for each
    chunk: wait for its rows, regroup by local expert, run the experts, post the outputs back.
    Each chunk's experts run as their own small autograd graph on detached inputs, which backward
    differentiates with torch.autograd.grad; the input gradients travel back overlapped, and the
    expert weights (inputs of this function) get the sum over chunks, accumulated once (DeepSpeed's
    ZeRO-2 reduces a gradient when it is accumulated and refuses a second one).
    """

    @staticmethod
    def forward(ctx, rows, chunks: list[_Chunk], experts: nn.Module, group, *params):
        sizes = [sum(c.send_splits) for c in chunks]
        posted = [
            _post_rows(r, c.recv_splits, c.send_splits, group, "tokens, overlapped")
            for c, r in zip(chunks, rows.split(sizes))
        ]
        out = torch.empty_like(rows)
        returning, graphs = [], []
        for c, rows_in, out_c in zip(chunks, posted, out.split(sizes)):
            with torch.enable_grad():
                x = rows_in.wait().index_select(0, c.regroup).requires_grad_()  # (R, D)
                y = experts(x, c.tokens_per_local_expert)
            back = y.detach().index_select(0, c.ungroup)
            returning.append(
                _Posted(out_c, back, c.send_splits, c.recv_splits, group, "expert outputs, overlapped")
            )
            graphs.append((x, y))
        for p in returning:
            p.wait()
        ctx.chunks, ctx.graphs, ctx.group, ctx.params = chunks, graphs, group, params
        return out

    @staticmethod
    def backward(ctx, grad_out):
        chunks, group = ctx.chunks, ctx.group
        sizes = [sum(c.send_splits) for c in chunks]
        posted = [
            _post_rows(g, c.recv_splits, c.send_splits, group, "expert outputs backward, overlapped")
            for c, g in zip(chunks, grad_out.split(sizes))
        ]
        grad_rows = torch.empty_like(grad_out)
        grad_params = [torch.zeros_like(p) for p in ctx.params]
        returning = []
        for c, grad_in, (x, y), gr_c in zip(chunks, posted, ctx.graphs, grad_rows.split(sizes)):
            grad_y = grad_in.wait().index_select(0, c.regroup)
            gx, *gp = torch.autograd.grad(y, (x, *ctx.params), grad_y, allow_unused=True)
            gx = gx if gx is not None else torch.zeros_like(x)
            for total, g in zip(grad_params, gp):
                if g is not None:
                    total += g
            back = gx.index_select(0, c.ungroup)
            returning.append(
                _Posted(gr_c, back, c.send_splits, c.recv_splits, group, "tokens backward, overlapped")
            )
        for p in returning:
            p.wait()
        del ctx.graphs
        return grad_rows, None, None, None, *grad_params


class AllToAllDispatcher(LocalDispatcher):
    def __init__(
        self,
        num_experts: int,
        top_k: int,
        capacity_factor: float | None,
        group: dist.ProcessGroup,
        ep: int,
        overlap_chunks: int = 1,
    ):
        super().__init__(num_experts, top_k, capacity_factor)
        self.group = group
        self.ep = ep
        self.num_local_experts = num_experts // ep
        self.overlap_chunks = overlap_chunks

    def route(self, x: torch.Tensor, routing: Routing, experts: nn.Module) -> tuple[torch.Tensor, int]:
        if self.overlap_chunks == 1:
            return super().route(x, routing, experts)
        ep, El, C = self.ep, self.num_local_experts, self.overlap_chunks
        x_sorted, counts, state = self.permute(x, routing, chunks=C)  # (S, D), (C, E)
        per_rank = counts.view(C, ep, El)
        # recv_counts[src, c, e]: rows rank `src` sends to this rank's local expert e in chunk c
        recv_counts = _all_to_all(per_rank.transpose(0, 1).flatten(), [C * El] * ep, [C * El] * ep,
                                  self.group, "token counts").view(ep, C, El)  # fmt: skip
        send_splits, recv_splits = per_rank.sum(-1).tolist(), recv_counts.sum(-1).T.tolist()
        chunks = [
            _Chunk(
                send_splits[c], recv_splits[c], recv_counts[:, c].sum(0), *_regroup_order(recv_counts[:, c])
            )
            for c in range(C)
        ]
        params = [p for p in experts.parameters() if p.requires_grad]
        y_sorted = _OverlappedExperts.apply(x_sorted, chunks, experts, self.group, *params)
        return self.unpermute(y_sorted, state), state.num_dropped

    def dispatch(
        self, x: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, torch.Tensor, ExpertParallelState]:
        ep, El = self.ep, self.num_local_experts
        x_sorted, tokens_per_expert, local_state = self.permute(x, routing)  # (S, D), (E,)
        # recv_counts[src, e]: rows rank `src` sends to this rank's local expert e
        recv_counts = _all_to_all(tokens_per_expert, [El] * ep, [El] * ep, self.group, "token counts")
        recv_counts = recv_counts.view(ep, El)
        send_splits = tokens_per_expert.view(ep, El).sum(dim=1).tolist()
        recv_splits = recv_counts.sum(dim=1).tolist()
        x_recv = _AllToAll.apply(x_sorted, recv_splits, send_splits, self.group, "tokens")  # (R, D)
        regroup, ungroup = _regroup_order(recv_counts)
        state = ExpertParallelState(local_state, regroup, ungroup, send_splits, recv_splits)
        return _PermuteRows.apply(x_recv, regroup, ungroup), recv_counts.sum(dim=0), state

    def combine(self, y: torch.Tensor, state: ExpertParallelState) -> torch.Tensor:
        y_recv = _PermuteRows.apply(y, state.ungroup, state.regroup)  # back to (source, expert) order
        y_sorted = _AllToAll.apply(y_recv, state.send_splits, state.recv_splits, self.group, "expert outputs")
        return self.unpermute(y_sorted, state.local)


def apply_expert_parallel(model: nn.Module, topology: Topology, overlap_chunks: int = 1) -> None:
    """Keep this rank's expert shard of every MoE layer and install the all-to-all dispatcher
    (`overlap_chunks` > 1: the overlapped one, see _OverlappedExperts).

    The model must be built identically on every rank first (same seed), so the shards together
    are exactly the single-process model. With ep=1 nothing changes: the local dispatcher stays.
    """
    ep = topology.ep
    if ep == 1:
        return
    start = topology.ep_rank
    for module in model.modules():
        if not isinstance(module, MoE):
            continue
        El = module.num_experts // ep
        experts = module.experts
        for name, full in list(experts.named_parameters(recurse=False)):  # all (E, ...)
            shard = full.detach()[start * El : (start + 1) * El].clone()
            setattr(experts, name, nn.Parameter(shard, requires_grad=full.requires_grad))
        old = module.dispatcher
        module.dispatcher = AllToAllDispatcher(
            old.num_experts, old.top_k, old.capacity_factor, topology.ep_group, ep, overlap_chunks
        )


def _is_expert_key(key: str) -> bool:
    return ".experts." in key


def expert_shards_to_dtensors(state, topology: Topology, inverse: bool = False, _expert=False):
    """Present local expert shards as DTensors sharded on dim 0 over the `ep` mesh axis, so DCP
    stores global tensors and can reload them at any ep (inverse=True unwraps them again).

    Walks nested dicts; applies to the (E/ep, ...) tensors under keys naming experts, in the model
    state dict and in the optimizer state (exp_avg, exp_avg_sq). A no-op when ep == 1.
    """
    if topology.ep == 1:
        return state
    if isinstance(state, dict):
        return {
            k: expert_shards_to_dtensors(v, topology, inverse, _expert or _is_expert_key(str(k)))
            for k, v in state.items()
        }
    if inverse and isinstance(state, DTensor):
        return state.to_local()
    if not inverse and _expert and isinstance(state, torch.Tensor) and state.ndim == 3:
        return DTensor.from_local(state, topology.mesh, [Replicate(), Shard(0)], run_check=False)
    return state
