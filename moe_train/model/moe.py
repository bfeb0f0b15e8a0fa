"""The Mixture-of-Experts FFN: top-k router, load-balancing losses, token dispatch and grouped experts.

Data path: router -> dispatcher.route: the (token, expert) assignments sorted by expert, the
experts on contiguous slices, each token's outputs summed with its router weights -> + shared
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
    (update_bias).

    Group-limited routing (DeepSeek-V2's device-limited, V3's node-limited): with `topk_groups` M
    of `num_groups` G groups of consecutive experts, each token first picks the M groups whose top
    (k / M) routing scores sum highest, then its k experts from those groups only (Megatron-Core's
    group_limited_topk); with G = parallel.ep a token's experts are on at most M ranks, so it is
    sent to at most M ranks. `scaling_factor` multiplies the combine weights (V3's routed scaling
    factor, applied after any renormalisation)."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        expert_bias: bool = False,
        score_function: str = "softmax",
        num_groups: int = 1,
        topk_groups: int = 0,
        scaling_factor: float = 1.0,
    ):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.top_k = top_k
        self.renormalize = renormalize
        self.sigmoid = score_function == "sigmoid"
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.scaling_factor = scaling_factor
        # a buffer: checkpointed with the model, never seen by the optimizer
        self.register_buffer("expert_bias", torch.zeros(num_experts) if expert_bias else None)

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.gate(x).float()  # (N, E): routing in fp32 even under autocast
        scores = logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)  # (N, E)
        choice = scores if self.expert_bias is None else scores + self.expert_bias  # picks the experts
        if self.topk_groups:
            choice = self._only_top_groups(choice)
        experts = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(-1, experts)  # (N, k)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.scaling_factor != 1.0:
            weights = weights * self.scaling_factor
        probs = scores / scores.sum(dim=-1, keepdim=True) if self.sigmoid else scores
        return Routing(logits, probs, experts, weights)

    def _only_top_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """choice (N, E) with -inf outside each token's topk_groups best groups."""
        grouped = choice.view(choice.shape[0], self.num_groups, -1)  # (N, G, E / G)
        group_scores = grouped.topk(self.top_k // self.topk_groups, dim=-1).values.sum(dim=-1)  # (N, G)
        top = group_scores.topk(self.topk_groups, dim=-1).indices  # (N, M)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top, True)  # (N, G)
        return grouped.masked_fill(~keep.unsqueeze(-1), -math.inf).view_as(choice)

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
class Bags:
    """M rows, each belonging to one of R slots (row j to slot `index[j]`): `members` lists the rows
    slot by slot and `offsets` says where each slot's list starts (an empty slot's list is empty).
    The slots are tokens (a token's k expert rows), or rows received from another rank."""

    index: torch.Tensor  # (M,) slot of each row
    members: torch.Tensor  # (M,) the rows, grouped by slot
    offsets: torch.Tensor  # (R,) start of each slot's rows in `members`

    @staticmethod
    def of(index: torch.Tensor, num_slots: int, members: torch.Tensor | None = None) -> Bags:
        """`members`, where the caller has it already: any order of the rows grouped by slot."""
        sizes = torch.bincount(index, minlength=num_slots)
        members = index.argsort(stable=True) if members is None else members
        return Bags(index, members, sizes.cumsum(0) - sizes)

    def sum(self, rows: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(M, D) rows, optionally weighted (M,) -> (R, D): each slot's rows summed.

        embedding_bag's sum is the gather, the weighting and the sum in one kernel, with no (M, D)
        intermediate: on 2 CPU cores 3-4x faster than index_select then a sum, and a scatter-add
        (index_add) costs 2.5-10x more."""
        per_sample = None if weights is None else weights.index_select(0, self.members)
        return F.embedding_bag(self.members, rows, self.offsets, mode="sum", per_sample_weights=per_sample)


class _Gather(torch.autograd.Function):
    """x (R, D) -> x[bags.index] (M, D); backward: each slot's row gradients summed (bags.sum): a
    gather in both directions, no scatter."""

    @staticmethod
    def forward(ctx, x, bags: Bags):
        ctx.bags = bags
        return x.index_select(0, bags.index)

    @staticmethod
    def backward(ctx, grad_rows):
        return ctx.bags.sum(grad_rows.contiguous()), None


class _BagSum(torch.autograd.Function):
    """rows (M, D) and weights (M,) or None -> (R, D): each slot's rows, weighted, summed.

    Backward: row j's gradient is w_j * grad_out[index_j] (a gather), w_j's the dot product of
    grad_out[index_j] with row j. Weighting here rather than on the experts' hidden activation
    leaves the experts' elementwise work as a dense SwiGLU's."""

    @staticmethod
    def forward(ctx, rows, weights, bags: Bags):
        ctx.bags = bags
        ctx.save_for_backward(rows, weights)
        return bags.sum(rows, weights)

    @staticmethod
    def backward(ctx, grad_out):
        rows, weights = ctx.saved_tensors
        grad_rows = grad_out.index_select(0, ctx.bags.index)  # (M, D)
        if weights is None:
            return grad_rows, None, None
        grad_weights = torch.linalg.vecdot(grad_rows, rows) if ctx.needs_input_grad[1] else None
        return grad_rows.mul_(weights.unsqueeze(-1)), grad_weights, None


def gather_rows(x: torch.Tensor, bags: Bags) -> torch.Tensor:
    """x (R, D) -> (M, D): the row of x each of the bags' rows belongs to."""
    return _Gather.apply(x, bags)


def sum_rows(rows: torch.Tensor, bags: Bags, weights: torch.Tensor | None = None) -> torch.Tensor:
    """rows (M, D) -> (R, D), optionally weighted (M,): the adjoint of gather_rows."""
    return _BagSum.apply(rows, weights, bags)


@dataclass
class ExpertBatch:
    """Assignments of rows to experts, sorted by expert: what the experts compute, and the way
    back. Sorted assignment i reads row `bags.index[i]`, and its output is summed back into it."""

    bags: Bags  # slots: the rows; members: each row's sorted assignments
    order: torch.Tensor  # (S,) assignment of each sorted position
    counts: torch.Tensor  # (E,) sorted assignments per expert
    num_dropped: int  # assignments over capacity, left out


def within_capacity(
    expert: torch.Tensor, num_experts: int, capacity: int | None, order: torch.Tensor | None = None
) -> torch.Tensor | None:
    """(A,) bool: each expert keeps its first `capacity` assignments, in assignment order (token
    order); None without a limit. `order`: expert.argsort(stable=True), where the caller has it."""
    if capacity is None:
        return None
    order = expert.argsort(stable=True) if order is None else order
    counts = torch.bincount(expert, minlength=num_experts)
    rank_in_expert = torch.empty_like(order)
    rank_in_expert[order] = (
        torch.arange(order.numel(), device=order.device) - (counts.cumsum(0) - counts)[expert[order]]
    )
    return rank_in_expert < capacity


def sort_by_expert(
    row: torch.Tensor, expert: torch.Tensor, num_rows: int, num_experts: int, capacity: int | None = None
) -> ExpertBatch:
    """A assignments (row (A,) in nondecreasing order, expert (A,)) stably sorted by expert, each
    expert keeping its first `capacity` if given."""
    order = expert.argsort(stable=True)  # (A,)
    keep = within_capacity(expert, num_experts, capacity, order)
    if keep is not None:
        order = order[keep.index_select(0, order)]
    counts = torch.bincount(expert, minlength=num_experts)
    counts = counts if capacity is None else counts.clamp(max=capacity)
    # sorted positions listed by assignment, so grouped by row: the bags' members, no second sort
    position = torch.full_like(expert, -1) if keep is not None else torch.empty_like(expert)
    position[order] = torch.arange(order.numel(), device=order.device)
    members = position if keep is None else position[position >= 0]
    bags = Bags.of(row.index_select(0, order), num_rows, members)
    return ExpertBatch(bags, order, counts, expert.numel() - order.numel())


def run_experts(
    x: torch.Tensor, weights: torch.Tensor, batch: ExpertBatch, experts: nn.Module
) -> torch.Tensor:
    """x (R, D), weights (A,) of the assignments -> (R, D): each row's sum over its kept
    assignments of weight * the expert's output (a row with none: zeros)."""
    y = experts(gather_rows(x, batch.bags), batch.counts)  # (S, D)
    return sum_rows(y, batch.bags, weights.index_select(0, batch.order).to(y.dtype))


class LocalDispatcher:
    """Single-device routing: the N * k assignments sorted by expert, the experts run on contiguous
    slices, and each token's k outputs summed with the router weights.

    With a capacity factor, each expert keeps its first `capacity` assignments in token order and the
    rest are dropped (they add nothing to the output). Expert parallelism (moe_train/parallel)
    replaces this with a dispatcher that moves the rows between ranks.
    """

    def __init__(self, num_experts: int, top_k: int, capacity_factor: float | None = None):
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    @staticmethod
    def assignments(routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat (token, slot) assignments, in token order: token (A,) and expert (A,)."""
        num_tokens, k = routing.experts.shape
        expert = routing.experts.flatten()
        return torch.arange(num_tokens, device=expert.device).repeat_interleave(k), expert

    def route(self, x: torch.Tensor, routing: Routing, experts: nn.Module) -> tuple[torch.Tensor, int]:
        """The routed output (N, D) and the number of dropped assignments."""
        token, expert = self.assignments(routing)
        batch = sort_by_expert(token, expert, x.shape[0], self.num_experts, self.capacity(x.shape[0]))
        return run_experts(x, routing.weights.flatten(), batch, experts), batch.num_dropped


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
        topk_groups: int = 0,
        routed_scaling_factor: float = 1.0,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_expert_groups = num_expert_groups
        self.aux_loss_scope = aux_loss_scope
        self.router = TopKRouter(
            dim, num_experts, top_k, renormalize, expert_bias, score_function,
            num_expert_groups, topk_groups, routed_scaling_factor,
        )  # fmt: skip
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
