"""The Mixture-of-Experts FFN: top-k router, load-balancing losses, token dispatch and grouped experts.

Data path: router -> dispatcher.dispatch (sort tokens by expert) -> experts on contiguous slices
-> dispatcher.combine (unsort, sum over each token's k rows weighted by the router) -> + shared
experts.
The dispatcher is a plain attribute that expert parallelism (moe_train/parallel) swaps for one that
moves tokens across ranks; this file holds the single-device one.

Shape legend: N tokens in the layer, D model dim, E experts (El local to this rank), k top-k,
S = N * k routed assignments (fewer after capacity drops), F expert hidden dim.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.model.layers import FeedForward


@dataclass
class Routing:
    """One MoE layer's routing decision for N tokens."""

    logits: torch.Tensor  # (N, E) fp32
    probs: torch.Tensor  # (N, E) fp32, each row sums to 1: the softmax, or the sigmoid scores normalised
    experts: torch.Tensor  # (N, k) int64 expert ids
    weights: torch.Tensor  # (N, k) fp32 combine weights


class TopKRouter(nn.Module):
    """Linear gate, a score per expert, top-k, optional renormalisation of the top-k weights.

    Scores: softmax over the experts (Mixtral, DeepSeekMoE), or an independent sigmoid per expert
    (DeepSeek-V3); the load-balancing losses see the sigmoid scores normalised to sum to 1, as
    Megatron-Core's. With expert_bias (auxiliary-loss-free balancing), the top-k is taken over
    scores + bias while the weights are the chosen experts' scores: the bias steers which experts a
    token goes to, not how much each contributes (DeepSeek-V3). The trainer moves it between steps
    (update_bias)."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        expert_bias: bool = False,
        score_function: str = "softmax",
    ):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.top_k = top_k
        self.renormalize = renormalize
        self.sigmoid = score_function == "sigmoid"
        # a buffer: checkpointed with the model, never seen by the optimizer
        self.register_buffer("expert_bias", torch.zeros(num_experts) if expert_bias else None)

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.gate(x).float()  # (N, E): routing in fp32 even under autocast
        scores = logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)  # (N, E)
        if self.expert_bias is None:
            weights, experts = scores.topk(self.top_k, dim=-1)  # (N, k)
        else:
            experts = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices  # (N, k)
            weights = scores.gather(-1, experts)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        probs = scores / scores.sum(dim=-1, keepdim=True) if self.sigmoid else scores
        return Routing(logits, probs, experts, weights)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor, rate: float) -> None:
        """Move the bias by `rate` toward balance, from this step's assignments per expert (E,),
        counted over the whole global batch so that every rank moves it alike."""
        counts = tokens_per_expert.to(self.expert_bias)
        self.expert_bias += rate * torch.sign(counts.mean() - counts)


def load_balancing_loss(
    probs: torch.Tensor, tokens_per_expert: torch.Tensor, top_k: int, num_groups: int | None = None
) -> torch.Tensor:
    """Switch/GShard auxiliary loss sum_e f_e * P_e, normalised so balanced routing gives 1.0.

    f_e = E * (share of the N * k assignments that went to expert e), 1 when balanced (not
    differentiable); P_e the mean router probability of expert e (differentiable); the same
    normalisation as Megatron-Core. With num_groups G, DeepSeekMoE's device-level loss over G
    groups of consecutive experts: sum_g mean_{e in g}(f_e) * sum_{e in g}(P_e), also 1.0 when the
    groups are balanced.
    """
    num_tokens, num_experts = probs.shape
    num_tokens = max(num_tokens, 1)  # a rank that routes no tokens: 0, not 0 / 0
    f = tokens_per_expert.float() * (num_experts / (num_tokens * top_k))  # (E,)
    p = probs.sum(dim=0) / num_tokens  # (E,)
    if num_groups is not None:
        f, p = f.view(num_groups, -1).mean(dim=1), p.view(num_groups, -1).sum(dim=1)  # (G,)
    return (f * p).sum()


def sequence_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, top_k: int) -> torch.Tensor:
    """The aux loss of each of B sequences on its own, averaged: probs (B, T, E), experts (B, T * k)
    (DeepSeek-V3's sequence-wise balance loss, normalised as Megatron-Core's seq_aux_loss)."""
    num_sequences, length, num_experts = probs.shape
    length = max(length, 1)  # a rank that routes no tokens: 0, not 0 / 0
    ones = torch.ones(experts.shape, device=probs.device)
    counts = probs.new_zeros(num_sequences, num_experts).scatter_add_(1, experts, ones)  # (B, E)
    f = counts * (num_experts / (length * top_k))
    return (f * probs.sum(dim=1) / length).sum(dim=1).mean()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()


@dataclass
class DispatchState:
    """What combine needs to undo dispatch."""

    order: torch.Tensor  # (S,) flat assignment (token * k + slot) of each sorted row
    token: torch.Tensor  # (S,) token of each sorted row: order // k
    inverse: torch.Tensor | None  # (N * k,) sorted row of each assignment; None if any was dropped
    weights: torch.Tensor  # (N, k) router weights of each token's assignments (routing.weights)
    num_tokens: int  # N
    num_assignments: int  # N * k, before any capacity drop

    @property
    def num_dropped(self) -> int:
        return self.num_assignments - self.token.numel()

    @property
    def row_weights(self) -> torch.Tensor:
        """(S,) router weight of each sorted row."""
        return self.weights.flatten().index_select(0, self.order)


# Without drops every token has exactly k sorted rows, so the two permutations are gathers that
# are each other's adjoint: no scatter (index_put / index_add) in either direction. On 2 CPU cores
# the scatters that x[token] and index_add would run in backward cost 2.5-10x more.
class _GatherRows(torch.autograd.Function):
    """x (N, D) -> x[token] (S = N * k, D); backward: each token's k row gradients summed."""

    @staticmethod
    def forward(ctx, x, token, inverse, top_k):
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad_rows):
        (inverse,) = ctx.saved_tensors
        grad_x = F.embedding_bag(inverse.view(-1, ctx.top_k), grad_rows.contiguous(), mode="sum")
        return grad_x, None, None, None


class _WeightedSumOverK(torch.autograd.Function):
    """rows (S = N * k, D), router weights (N, k) -> (N, D): each token's k rows, weighted, summed.

    embedding_bag's sum with per-sample weights is the gather, the weighting and the sum in one
    kernel, no (N, k, D) intermediate; on 2 CPU cores as fast as its unweighted sum, and 3-4x
    faster than index_select then sum.
    Backward: the gradient of row j is w_j * grad_out[token_j] (a gather), of w_j the dot product
    of grad_out[token_j] with row j. Weighting here rather than on the experts' hidden activation
    leaves the experts' elementwise work as a dense SwiGLU's and sends no weights across ranks.
    """

    @staticmethod
    def forward(ctx, rows, weights, token, order, inverse):
        ctx.save_for_backward(rows, weights, token, order, inverse)
        return F.embedding_bag(inverse.view_as(weights), rows, mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx, grad_out):
        rows, weights, token, order, inverse = ctx.saved_tensors
        grad_rows = grad_out.index_select(0, token)  # (S, D)
        grad_weights = None
        if ctx.needs_input_grad[1]:
            grad_weights = torch.linalg.vecdot(grad_rows, rows).index_select(0, inverse).view_as(weights)
        grad_rows.mul_(weights.flatten().index_select(0, order).unsqueeze(-1))
        return grad_rows, grad_weights, None, None, None


class LocalDispatcher:
    """Single-device dispatch: a stable sort of the N * k assignments by expert id.

    With a capacity factor, each expert keeps its first `capacity` assignments in token order and the
    rest are dropped (they add nothing to the output). The permutation is also the first and last
    step of the expert-parallel dispatcher, which builds on this class.
    """

    def __init__(self, num_experts: int, top_k: int, capacity_factor: float | None = None):
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def permute(
        self, x: torch.Tensor, routing: Routing, chunks: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        """Rows of x (N, D) grouped by expert: (S, D), tokens per expert (E,) and the undo state.

        With chunks > 1, the tokens are cut into `chunks` consecutive runs of ceil(N / chunks) and
        the rows (after any capacity drop, which does not depend on chunks) are grouped by
        (chunk, expert); the counts are then (chunks, E).
        """
        flat_experts = routing.experts.flatten()  # (N * k,)
        num_assignments = flat_experts.numel()
        order = flat_experts.argsort(stable=True)  # (N * k,) flat assignment of each sorted row
        tokens_per_expert = torch.bincount(flat_experts, minlength=self.num_experts)  # (E,)
        capacity = self.capacity(x.shape[0])
        if capacity is not None:
            starts = tokens_per_expert.cumsum(0) - tokens_per_expert  # (E,) first sorted row of e
            rank_in_expert = torch.arange(num_assignments, device=x.device) - starts[flat_experts[order]]
            order = order[rank_in_expert < capacity]
            tokens_per_expert = tokens_per_expert.clamp(max=capacity)
        if chunks > 1:  # rows of one expert are in token order, so a stable sort by chunk keeps it
            chunk_tokens = max(1, math.ceil(x.shape[0] / chunks))
            key = order // (self.top_k * chunk_tokens) * self.num_experts + flat_experts[order]  # (S,)
            order = order[key.argsort(stable=True)]
            tokens_per_expert = torch.bincount(key, minlength=chunks * self.num_experts).view(chunks, -1)
        token = order // self.top_k  # (S,)
        if order.numel() == num_assignments:
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(num_assignments, device=x.device)
            x_sorted = _GatherRows.apply(x, token, inverse, self.top_k)
        else:
            inverse = None
            x_sorted = x.index_select(0, token)
        state = DispatchState(order, token, inverse, routing.weights, x.shape[0], num_assignments)
        return x_sorted, tokens_per_expert, state

    def unpermute(self, y_sorted: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Inverse of permute: (S, D) expert outputs -> (N, D), each token's k rows weighted by the
        router and summed."""
        if state.inverse is not None:
            weights = state.weights.to(y_sorted.dtype)  # fp32 from the router; one dtype for embedding_bag
            return _WeightedSumOverK.apply(y_sorted, weights, state.token, state.order, state.inverse)
        y_sorted = y_sorted * state.row_weights.to(y_sorted.dtype).unsqueeze(-1)
        out = y_sorted.new_zeros(state.num_tokens, y_sorted.shape[-1])  # dropped rows add nothing
        return out.index_add(0, state.token, y_sorted)

    def route(self, x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> tuple[torch.Tensor, int]:
        """dispatch -> experts -> combine: the routed output (N, D) and the number of dropped rows."""
        x_sorted, tokens_per_local_expert, state = self.dispatch(x, routing)
        return self.combine(experts(x_sorted, tokens_per_local_expert), state), state.num_dropped

    def dispatch(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        """Returns the rows for this rank's experts (grouped by expert), their counts and the
        state combine needs."""
        return self.permute(x, routing)

    def combine(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        return self.unpermute(y, state)


def grouped_mm_dtype(x: torch.Tensor, *dims: int) -> torch.dtype | None:
    """The dtype torch._grouped_mm runs the experts in for input x, or None where it cannot (the
    loop over experts runs instead): on a CPU, x's own dtype or the CPU autocast dtype (fp32 or
    bf16); on a Hopper-class GPU, bf16 (bf16 inputs or bf16 autocast). Rows of its operands must
    be multiples of 16 bytes, so every one of `dims` (model and expert widths) is checked."""
    if not hasattr(torch, "_grouped_mm"):
        return None
    if x.device.type == "cpu":
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        dtype = dtype if dtype in (torch.float32, torch.bfloat16) else None
    elif x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9:
        autocast_bf16 = (
            torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
        )
        dtype = torch.bfloat16 if x.dtype == torch.bfloat16 or autocast_bf16 else None
    else:
        dtype = None
    if dtype is None or any(d * dtype.itemsize % 16 for d in dims):
        return None
    return dtype


class _SwiGLU(torch.autograd.Function):
    """(S, 2F) gate | up -> (S, F) silu(gate) * up.

    The backward writes the gate and up gradients straight into the two halves of one (S, 2F)
    gradient; autograd's own graph would make them separately and copy them together (chunk's
    backward): at the Mixtral width on 2 cores 39 ms against 46 for forward and backward.
    """

    @staticmethod
    def forward(ctx, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        s = F.silu(gate)  # (S, F)
        ctx.save_for_backward(gate_up, s)
        return s * up

    @staticmethod
    def backward(ctx, grad_out):
        gate_up, s = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.mul(grad_out, s, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad_out * up, gate, grad_input=grad_gate)
        return grad_gate_up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """(n, 2F) gate | up -> (n, F) silu(gate) * up."""
    return _SwiGLU.apply(gate_up)


class GroupedExperts(nn.Module):
    """E SwiGLU experts with weights stacked on dim 0, so expert parallelism can shard them by rows.

    The gate and up projections are one weight, w13 = [w1 | w3] on its last dim (as Megatron-Core's
    linear_fc1 and transformers' gate_up_proj): one product per expert instead of two, and one for
    the input gradient in backward. On 2 CPU cores that is 2-4 % of the whole layer at the
    fine-grained shapes (64 experts of 384 rows) and level at the wide ones, where it needs
    swiglu's own backward (without it, 6 % slower at DBRX's width). The router weights are applied
    by the combine, not here.

    forward takes tokens already grouped by expert and how many each expert has, and runs each
    weight as one grouped product (torch._grouped_mm: on CPUs, and on Hopper GPUs in bf16); where
    that cannot run, the loop over experts, which is also the reference the tests compare with.
    On 2 CPU cores the grouped products measured as fast as a hand-fused loop with its own backward
    (within 2 % at every benchmark shape), which they replaced.
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.num_experts = num_experts
        self.w13 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden_dim))  # gate | up
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # down
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default per expert: uniform in +-1/sqrt(fan_in). (Transformer re-inits.)"""
        for w in (self.w13, self.w2):
            bound = w.shape[1] ** -0.5
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x (S, D) grouped by expert, tokens_per_expert (El,) -> (S, D)."""
        dtype = grouped_mm_dtype(x, *self.w2.shape[1:])
        if dtype is None:
            return self._forward_loop(x, tokens_per_expert)
        return self._forward_grouped(x.to(dtype), tokens_per_expert)

    def _forward_loop(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        # unbind, not w[e]: the backward of one unbind stacks all expert gradients at once, while
        # E separate w[e] selects would each materialise and add a full (E, ...) gradient.
        chunks = torch.split(x, tokens_per_expert.tolist())
        weights = zip(self.w13.unbind(0), self.w2.unbind(0))
        return torch.cat([swiglu(x_e @ w13) @ w2 for x_e, (w13, w2) in zip(chunks, weights)])

    def _forward_grouped(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        offsets = tokens_per_expert.cumsum(0).to(torch.int32)  # (El,) end row of each expert
        w13, w2 = (w.to(x.dtype) for w in (self.w13, self.w2))
        h = swiglu(torch._grouped_mm(x, w13, offs=offsets))  # (S, F)
        return torch._grouped_mm(h, w2, offs=offsets)


@dataclass
class MoEStats:
    """Per-layer, per-micro-batch router statistics (reduced across ranks in the trainer)."""

    aux_loss: torch.Tensor  # scalar, differentiable
    device_aux_loss: torch.Tensor  # scalar, differentiable: the same over the groups of experts
    z_loss: torch.Tensor  # scalar, differentiable
    tokens_per_expert: torch.Tensor  # (E,) routed assignments before any drop, detached
    dropped: int  # assignments dropped by the capacity limit


class MoE(nn.Module):
    """Routed experts plus optional shared experts that every token passes through."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int,
        num_shared_experts: int = 0,
        renormalize: bool = True,
        capacity_factor: float | None = None,
        expert_bias: bool = False,
        num_expert_groups: int = 1,
        score_function: str = "softmax",
        aux_loss_scope: str = "batch",
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_expert_groups = num_expert_groups
        self.aux_loss_scope = aux_loss_scope
        self.router = TopKRouter(dim, num_experts, top_k, renormalize, expert_bias, score_function)
        self.experts = GroupedExperts(num_experts, dim, hidden_dim)
        # k shared SwiGLU experts of hidden F are exactly one SwiGLU of hidden k * F.
        self.shared_experts = (
            FeedForward(dim, num_shared_experts * hidden_dim) if num_shared_experts else None
        )
        self.dispatcher = LocalDispatcher(num_experts, top_k, capacity_factor)

    @torch.compiler.disable  # data-dependent shapes: torch.compile covers the rest of the block
    def _routed(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, int]:
        return self.dispatcher.route(x, routing, self.experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        routing = self.router(x)
        out, num_dropped = self._routed(x, routing)  # (N, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)

        tokens_per_expert = torch.bincount(routing.experts.flatten(), minlength=self.num_experts)
        if self.aux_loss_scope == "sequence":  # x is (B, T, D); (N, D) counts as one sequence
            sequences = shape[0] if len(shape) == 3 else 1
            probs, experts = routing.probs.view(sequences, -1, self.num_experts), routing.experts
            aux_loss = sequence_balancing_loss(probs, experts.view(sequences, -1), self.top_k)
        else:
            aux_loss = load_balancing_loss(routing.probs, tokens_per_expert, self.top_k)
        if self.num_expert_groups > 1:
            device_aux_loss = load_balancing_loss(
                routing.probs, tokens_per_expert, self.top_k, self.num_expert_groups
            )
        else:  # one group holds every assignment and all probability: the loss is the constant 1
            device_aux_loss = aux_loss.new_ones(())
        stats = MoEStats(
            aux_loss=aux_loss,
            device_aux_loss=device_aux_loss,
            z_loss=router_z_loss(routing.logits),
            tokens_per_expert=tokens_per_expert.detach(),
            dropped=num_dropped,
        )
        return out.view(shape), stats


@contextlib.contextmanager
def dropless(model: nn.Module) -> Iterator[None]:
    """Every MoE layer of `model` routes every token inside the block (no capacity limit, whichever
    dispatcher it has): sampling, as a model exported to Hugging Face does. A capacity factor is a
    training-time token budget."""
    dispatchers = [m.dispatcher for m in model.modules() if isinstance(m, MoE)]
    factors = [d.capacity_factor for d in dispatchers]
    for d in dispatchers:
        d.capacity_factor = None
    try:
        yield
    finally:
        for d, factor in zip(dispatchers, factors):
            d.capacity_factor = factor
