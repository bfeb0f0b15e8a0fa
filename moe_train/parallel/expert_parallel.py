"""Expert parallelism, applied to a finished model from outside: shard experts, install all-to-all.

Each MoE layer's stacked expert weights (E, ...) are cut on dim 0 into `ep` shards; rank i of an
expert-parallel group keeps experts [i * E/ep, (i + 1) * E/ep). Its dispatcher sends each token
once to each rank that holds any of its experts, not once per expert:
1. the local assignments are grouped by destination rank; a (token, rank) pair is one row to send,
   each assignment names its pair's row and its local expert (`meta`) and carries its router weight,
2. the counts (rows and assignments per rank) are exchanged (all_to_all_single, equal splits),
3. then the assignments' meta and weights, and the rows (all_to_all_single, uneven splits),
4. the receiving rank sorts the assignments by local expert, runs its experts and sums each received
   row's outputs with their router weights (moe_train.model.moe.run_experts, as a single device
   does for its tokens), and sends one row back per row received,
5. each token's returned rows are summed.
With top-k over E experts a token is sent to at most min(k, ep) ranks, and with group-limited
routing (model.moe.topk_groups, groups = ranks) to at most topk_groups. Backward runs the same
exchanges reversed; the router weights' gradients come back with the rows'.

With `parallel.ep_overlap_chunks` = C > 1 the tokens are cut into C chunks, each chunk's rows sent
as their own exchange, and the dispatcher runs the experts itself, between the exchanges
(`_OverlappedExperts`): every chunk's rows are posted at once (async all-to-all), the experts
compute chunk c while later chunks are still travelling, and chunk c's outputs travel back while
chunk c + 1 computes; backward overlaps the same way.

Shape legend: N local tokens, D dim, E experts, El = E / ep local experts, A assignments sent, U rows
(token, rank pairs) sent, R rows received.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from moe_train.model.moe import (
    Bags,
    ExpertBatch,
    LocalDispatcher,
    MoE,
    Routing,
    gather_rows,
    run_experts,
    sort_by_expert,
    sum_rows,
    within_capacity,
)
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
class _Exchange:
    """One chunk's rows: what this rank sends to, and receives from, each rank of the group, and
    the received assignments sorted by local expert (over the R received rows)."""

    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    batch: ExpertBatch  # the received assignments, over the received rows


class _OverlappedExperts(torch.autograd.Function):
    """The experts between the two exchanges, chunk by chunk, with the exchanges in flight.

    rows (U, D) grouped by (chunk, destination rank) and the received router weights (all chunks'
    assignments, chunk by chunk) -> one output row per row sent, in the same order. All chunks'
    rows are posted first; then for each chunk: wait for its rows, run the experts and sum each
    row's outputs (run_experts), post them back. Each chunk's experts run as their own small
    autograd graph on detached inputs, which backward differentiates with torch.autograd.grad; the
    input gradients travel back overlapped, and the expert weights (inputs of this function) get
    the sum over chunks, accumulated once (DeepSpeed's ZeRO-2 reduces a gradient when it is
    accumulated and refuses a second one).
    """

    @staticmethod
    def forward(ctx, rows, weights, chunks: list[_Exchange], experts: nn.Module, group, *params):
        sizes = [sum(c.send_splits) for c in chunks]
        posted = [
            _post_rows(r, c.recv_splits, c.send_splits, group, "tokens, overlapped")
            for c, r in zip(chunks, rows.split(sizes))
        ]
        out = torch.empty_like(rows)
        returning, graphs = [], []
        chunk_weights = weights.split([c.batch.order.numel() for c in chunks])  # (A,) each
        for c, rows_in, w, out_c in zip(chunks, posted, chunk_weights, out.split(sizes)):
            with torch.enable_grad():
                x, w = rows_in.wait().requires_grad_(), w.detach().requires_grad_()  # (R, D), (A,)
                y = run_experts(x, w, c.batch, experts)
            returning.append(
                _Posted(out_c, y.detach(), c.send_splits, c.recv_splits, group, "expert outputs, overlapped")
            )
            graphs.append((x, w, y))
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
        grad_weights, returning = [], []
        for c, grad_in, (x, w, y), gr_c in zip(chunks, posted, ctx.graphs, grad_rows.split(sizes)):
            gx, gw, *gp = torch.autograd.grad(y, (x, w, *ctx.params), grad_in.wait(), allow_unused=True)
            for total, g in zip(grad_params, gp):
                if g is not None:
                    total += g
            grad_weights.append(gw if gw is not None else torch.zeros_like(w))
            back = gx if gx is not None else torch.zeros_like(x)
            returning.append(
                _Posted(gr_c, back, c.send_splits, c.recv_splits, group, "tokens backward, overlapped")
            )
        for p in returning:
            p.wait()
        del ctx.graphs
        return grad_rows, torch.cat(grad_weights), None, None, None, *grad_params


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
        ep, El, C = self.ep, self.num_local_experts, self.overlap_chunks
        token, expert = self.assignments(routing)  # (A,) each, in token order
        keep = within_capacity(expert, self.num_experts, self.capacity(x.shape[0]))
        num_kept = expert.numel() if keep is None else int(keep.sum())
        # group the kept assignments by (chunk, destination rank), in token order within each
        chunk_tokens = max(1, math.ceil(x.shape[0] / C))
        key = token // chunk_tokens * ep + expert // El  # (A,)
        if keep is not None:
            key = key.masked_fill(~keep, C * ep)  # dropped: sorted last, then cut
        sent = key.argsort(stable=True)[:num_kept]  # (A,) assignments in sending order
        key, token = key[sent], token[sent]
        new_row = torch.ones_like(key, dtype=torch.bool)
        new_row[1:] = (key[1:] != key[:-1]) | (token[1:] != token[:-1])  # a new (token, rank) pair
        row = new_row.cumsum(0) - 1  # (A,) the row each assignment reads
        row_key, row_token = key[new_row], token[new_row]  # (U,)
        rows_per_key = torch.bincount(row_key, minlength=C * ep)
        # meta: the assignment's row within its (chunk, rank) block, and its local expert
        meta = (row - (rows_per_key.cumsum(0) - rows_per_key)[key]) * El + expert[sent] % El
        weights = routing.weights.flatten().index_select(0, sent)  # (A,)
        # counts[c, r] = (rows, assignments) this rank sends rank r in chunk c
        counts = torch.stack([rows_per_key, torch.bincount(key, minlength=C * ep)], dim=-1).view(C, ep, 2)
        recv_counts = _all_to_all(counts.transpose(0, 1).flatten(), [2 * C] * ep, [2 * C] * ep,
                                  self.group, "counts").view(ep, C, 2)  # fmt: skip
        sent_host, recv_host = counts.tolist(), recv_counts.tolist()  # the splits: [c][r] and [r][c]
        per_chunk = [sum(assignments for _, assignments in chunk) for chunk in sent_host]
        exchanges, recv_weights = [], []
        for c, (meta_c, weights_c) in enumerate(zip(meta.split(per_chunk), weights.split(per_chunk))):
            send_rows, send_assignments = (list(n) for n in zip(*sent_host[c]))
            recv_rows, recv_assignments = (list(n) for n in zip(*(recv_host[r][c] for r in range(ep))))
            meta_in = _all_to_all(meta_c, recv_assignments, send_assignments, self.group, "assignments")
            recv_weights.append(
                _AllToAll.apply(weights_c, recv_assignments, send_assignments, self.group, "router weights")
            )
            # the received row each received assignment reads: its source's block, then its row there
            source = torch.arange(ep, device=x.device).repeat_interleave(
                recv_counts[:, c, 1], output_size=len(meta_in)
            )
            first_row = recv_counts[:, c, 0].cumsum(0) - recv_counts[:, c, 0]  # (ep,)
            row_in = first_row[source] + meta_in // El  # nondecreasing
            batch = sort_by_expert(row_in, meta_in % El, sum(recv_rows), El)
            exchanges.append(_Exchange(send_rows, recv_rows, batch))
        token_bags = Bags.of(row_token, x.shape[0])
        x_sent = gather_rows(x, token_bags)  # (U, D)
        if C == 1:
            (exchange,) = exchanges
            x_in = _AllToAll.apply(x_sent, exchange.recv_splits, exchange.send_splits, self.group, "tokens")
            y_in = run_experts(x_in, recv_weights[0], exchange.batch, experts)  # (R, D)
            y_sent = _AllToAll.apply(
                y_in, exchange.send_splits, exchange.recv_splits, self.group, "expert outputs"
            )
        else:
            params = [p for p in experts.parameters() if p.requires_grad]
            y_sent = _OverlappedExperts.apply(
                x_sent, torch.cat(recv_weights), exchanges, experts, self.group, *params
            )
        return sum_rows(y_sent, token_bags), expert.numel() - num_kept


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
