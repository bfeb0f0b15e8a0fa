"""The Mixture-of-Experts FFN: top-k router, load-balancing losses, token dispatch and grouped experts.

Data path: router -> dispatcher.dispatch (sort tokens by expert) -> experts on contiguous slices
-> dispatcher.combine (unsort, weight by router scores) -> + shared experts.
The dispatcher is a plain attribute that expert parallelism (moe_train/parallel) swaps for one that
moves tokens across ranks; this file holds the single-device one.

Shape legend: N tokens in the layer, D model dim, E experts (El local to this rank), k top-k,
S = N * k routed assignments (fewer after capacity drops), F expert hidden dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.model.layers import FeedForward


@dataclass
class Routing:
    """One MoE layer's routing decision for N tokens."""

    logits: torch.Tensor  # (N, E) fp32
    probs: torch.Tensor  # (N, E) fp32 softmax
    experts: torch.Tensor  # (N, k) int64 expert ids
    weights: torch.Tensor  # (N, k) fp32 combine weights


class TopKRouter(nn.Module):
    """Linear gate, softmax over all experts, top-k, optional renormalisation of the top-k weights."""

    def __init__(self, dim: int, num_experts: int, top_k: int, renormalize: bool):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.top_k = top_k
        self.renormalize = renormalize

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.gate(x).float()  # (N, E): routing in fp32 even under autocast
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(logits, probs, experts, weights)


def load_balancing_loss(probs: torch.Tensor, tokens_per_expert: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch/GShard auxiliary loss E * sum_e f_e * P_e, normalised so balanced routing gives 1.0.

    f_e is the share of the N * k assignments that went to expert e (not differentiable) and P_e the
    mean router probability of expert e (differentiable); the same normalisation as Megatron-Core.
    """
    num_tokens, num_experts = probs.shape
    f = tokens_per_expert.float() / (num_tokens * top_k)  # (E,)
    p = probs.mean(dim=0)  # (E,)
    return num_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).square().mean()


@dataclass
class DispatchState:
    """What combine needs to undo dispatch."""

    order: torch.Tensor  # (S,) position in the flat (N * k) assignment list of each sorted row
    inverse: torch.Tensor  # (N * k,) sorted row of each assignment (row 0 for a dropped one)
    weights: torch.Tensor  # (N, k) combine weights, zero where the assignment was dropped
    num_assignments: int  # N * k, before any capacity drop

    @property
    def num_dropped(self) -> int:
        return self.num_assignments - self.order.numel()


class _Gather(torch.autograd.Function):
    """x_sorted = x[token] with a backward that gathers instead of scattering.

    Without drops every token has exactly k sorted rows, so the gradient of x is the sorted
    gradient put back in assignment order (one index_select through `inverse`) and summed over k:
    on 2 CPU cores 2.5x faster than index_add and 5x faster than the index_put that x[token]'s
    own backward runs. With drops, index_add (dropped rows add nothing).
    """

    @staticmethod
    def forward(ctx, x, token, inverse, top_k, dropless):
        ctx.save_for_backward(token, inverse)
        ctx.num_tokens, ctx.top_k, ctx.dropless = x.shape[0], top_k, dropless
        return x.index_select(0, token)  # (S, D)

    @staticmethod
    def backward(ctx, grad_sorted):
        token, inverse = ctx.saved_tensors
        num_tokens, dim = ctx.num_tokens, grad_sorted.shape[-1]
        if ctx.dropless:
            grad_x = grad_sorted.index_select(0, inverse).view(num_tokens, ctx.top_k, dim).sum(1)
        else:
            grad_x = grad_sorted.new_zeros(num_tokens, dim).index_add_(0, token, grad_sorted)
        return grad_x, None, None, None, None


class _Combine(torch.autograd.Function):
    """out[n] = sum_j weights[n, j] * y_sorted[inverse[n * k + j]]: a gather back to assignment
    order and one batched (1, k) x (k, D) product per token, instead of a weighted copy of all
    rows and a scatter-add; the backward is gathers and products too (no scatter)."""

    @staticmethod
    def forward(ctx, y_sorted, weights, inverse, order):
        num_tokens, top_k = weights.shape
        y_tok = y_sorted.index_select(0, inverse).view(num_tokens, top_k, -1)  # (N, k, D)
        w = weights.to(y_tok.dtype)
        ctx.save_for_backward(y_tok, w, order)
        ctx.weights_dtype = weights.dtype
        return torch.bmm(w.unsqueeze(1), y_tok).squeeze(1)  # (N, D)

    @staticmethod
    def backward(ctx, grad_out):
        y_tok, w, order = ctx.saved_tensors
        grad_out = grad_out.contiguous()  # (N, D); an expanded gradient would send bmm to a slow path
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_tok = w.unsqueeze(-1) * grad_out.unsqueeze(1)  # (N, k, D)
            grad_y = grad_tok.view(-1, grad_out.shape[-1]).index_select(0, order)  # (S, D)
        if ctx.needs_input_grad[1]:
            grad_w = torch.linalg.vecdot(y_tok, grad_out.unsqueeze(1)).to(ctx.weights_dtype)  # (N, k)
        return grad_y, grad_w, None, None


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

    def permute(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        """Rows of x (N, D) grouped by expert: (S, D), tokens per expert (E,) and the undo state."""
        flat_experts = routing.experts.flatten()  # (N * k,)
        num_assignments = flat_experts.numel()
        order = flat_experts.argsort(stable=True)  # (N * k,)
        tokens_per_expert = torch.bincount(flat_experts, minlength=self.num_experts)  # (E,)
        weights = routing.weights
        capacity = self.capacity(x.shape[0])
        if capacity is not None:
            starts = tokens_per_expert.cumsum(0) - tokens_per_expert  # (E,) first sorted row of e
            rank_in_expert = torch.arange(num_assignments, device=x.device) - starts[flat_experts[order]]
            order = order[rank_in_expert < capacity]
            tokens_per_expert = tokens_per_expert.clamp(max=capacity)
            kept = torch.zeros(num_assignments, dtype=torch.bool, device=x.device)
            kept[order] = True
            weights = weights * kept.view_as(weights)  # dropped: no output, no router gradient
        dropless = order.numel() == num_assignments
        inverse = torch.zeros(num_assignments, dtype=order.dtype, device=x.device)
        inverse[order] = torch.arange(order.numel(), device=x.device)
        x_sorted = _Gather.apply(x, order // self.top_k, inverse, self.top_k, dropless)  # (S, D)
        return x_sorted, tokens_per_expert, DispatchState(order, inverse, weights, num_assignments)

    def unpermute(self, y_sorted: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Inverse of permute: (S, D) expert outputs -> (N, D), the weighted sum over each token's k."""
        return _Combine.apply(y_sorted, state.weights, state.inverse, state.order)

    def dispatch(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        """Returns the rows for this rank's experts (grouped by expert), their counts and a state."""
        return self.permute(x, routing)

    def combine(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        return self.unpermute(y, state)


def grouped_mm_dtype(x: torch.Tensor) -> torch.dtype | None:
    """bf16 when torch._grouped_mm can run (a Hopper-class GPU, bf16 inputs or bf16 autocast),
    else None: the loop over experts runs instead."""
    if not (x.is_cuda and hasattr(torch, "_grouped_mm")):
        return None
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return None
    autocast_bf16 = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
    return torch.bfloat16 if x.dtype == torch.bfloat16 or autocast_bf16 else None


class _ExpertLoop(torch.autograd.Function):
    """The loop over experts with a hand-written backward: every product writes into its rows of
    one preallocated buffer (mm with out=), and the SwiGLU elementwise ops run once over all rows.

    Autograd's version of the same loop pays for what the dim-256 fine-grained shape cannot hide:
    a cat of the expert outputs, a split and cat of their gradients, a stack of the weight
    gradients, and 4 small elementwise kernels per expert. The loop stays the reference
    (GroupedExperts._forward_loop), and tests compare the two.
    """

    @staticmethod
    def forward(ctx, x, counts: list[int], w1, w3, w2):
        # x (S, D) grouped by expert; w1, w3 (El, D, F); w2 (El, F, D)
        rows = _expert_rows(counts)
        gate = x.new_empty(x.shape[0], w1.shape[-1])  # (S, F)
        up = torch.empty_like(gate)
        for e, r in rows:
            torch.mm(x[r], w1[e], out=gate[r])
            torch.mm(x[r], w3[e], out=up[r])
        act = F.silu(gate)
        h = act * up  # (S, F)
        y = x.new_empty(x.shape)  # (S, D)
        for e, r in rows:
            torch.mm(h[r], w2[e], out=y[r])
        ctx.save_for_backward(x, w1, w3, w2, gate, up, act, h)
        ctx.counts = counts
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w1, w3, w2, gate, up, act, h = ctx.saved_tensors
        rows = _expert_rows(ctx.counts)
        grad_y = grad_y.contiguous()
        need_x, _, need_w1, need_w3, need_w2 = ctx.needs_input_grad
        grad_w1, grad_w3, grad_w2 = (
            _zeros_for_empty(w, ctx.counts) if need else None
            for w, need in ((w1, need_w1), (w3, need_w3), (w2, need_w2))
        )
        grad_h = torch.empty_like(h)  # (S, F)
        for e, r in rows:
            torch.mm(grad_y[r], w2[e].T, out=grad_h[r])
            if need_w2:
                torch.mm(h[r].T, grad_y[r], out=grad_w2[e])
        grad_up = grad_h * act
        grad_gate = torch.ops.aten.silu_backward(grad_h.mul_(up), gate)
        grad_x = torch.empty_like(x) if need_x else None
        for e, r in rows:
            if need_x:
                torch.mm(grad_gate[r], w1[e].T, out=grad_x[r])
                grad_x[r].addmm_(grad_up[r], w3[e].T)
            if need_w1:
                torch.mm(x[r].T, grad_gate[r], out=grad_w1[e])
            if need_w3:
                torch.mm(x[r].T, grad_up[r], out=grad_w3[e])
        return grad_x, None, grad_w1, grad_w3, grad_w2


def _expert_rows(counts: list[int]) -> list[tuple[int, slice]]:
    """(expert, its rows) for every expert that has rows."""
    rows, start = [], 0
    for e, n in enumerate(counts):
        if n:
            rows.append((e, slice(start, start + n)))
        start += n
    return rows


def _zeros_for_empty(w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """A gradient buffer for w (El, ...): uninitialised, but zero for experts that got no rows."""
    grad = torch.empty_like(w)
    for e, n in enumerate(counts):
        if not n:
            grad[e].zero_()
    return grad


class GroupedExperts(nn.Module):
    """E SwiGLU experts with weights stacked on dim 0, so expert parallelism can shard them by rows.

    forward takes tokens already grouped by expert and how many each expert has.
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))  # gate
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))  # up
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # down
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default per expert: uniform in +-1/sqrt(fan_in). (Transformer re-inits.)"""
        for w in (self.w1, self.w3, self.w2):
            bound = w.shape[1] ** -0.5
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x (S, D) grouped by expert, tokens_per_expert (El,) -> (S, D)."""
        dtype = grouped_mm_dtype(x)
        if dtype is not None:
            return self._forward_grouped(x.to(dtype), tokens_per_expert)
        if torch.is_autocast_enabled(x.device.type):  # the fused loop writes with out=: no autocast
            return self._forward_loop(x, tokens_per_expert)
        return _ExpertLoop.apply(x, tokens_per_expert.tolist(), self.w1, self.w3, self.w2)

    def _forward_loop(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        # unbind, not w[e]: the backward of one unbind stacks all expert gradients at once, while
        # E separate w[e] selects would each materialise and add a full (E, ...) gradient.
        outputs = []
        chunks = torch.split(x, tokens_per_expert.tolist())
        for x_e, w1, w3, w2 in zip(chunks, self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)):
            h = F.silu(x_e @ w1) * (x_e @ w3)  # (n_e, F)
            outputs.append(h @ w2)  # (n_e, D)
        return torch.cat(outputs)

    def _forward_grouped(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        offsets = tokens_per_expert.cumsum(0).to(torch.int32)  # (El,) end row of each expert
        w1, w3, w2 = (w.to(x.dtype) for w in (self.w1, self.w3, self.w2))
        h = F.silu(torch._grouped_mm(x, w1, offs=offsets)) * torch._grouped_mm(x, w3, offs=offsets)
        return torch._grouped_mm(h, w2, offs=offsets)


@dataclass
class MoEStats:
    """Per-layer, per-micro-batch router statistics (reduced across ranks in the trainer)."""

    aux_loss: torch.Tensor  # scalar, differentiable
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
    ):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = TopKRouter(dim, num_experts, top_k, renormalize)
        self.experts = GroupedExperts(num_experts, dim, hidden_dim)
        # k shared SwiGLU experts of hidden F are exactly one SwiGLU of hidden k * F.
        self.shared_experts = (
            FeedForward(dim, num_shared_experts * hidden_dim) if num_shared_experts else None
        )
        self.dispatcher = LocalDispatcher(num_experts, top_k, capacity_factor)

    @torch.compiler.disable  # data-dependent shapes: torch.compile covers the rest of the block
    def _routed(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, int]:
        x_sorted, tokens_per_local_expert, state = self.dispatcher.dispatch(x, routing)
        y_sorted = self.experts(x_sorted, tokens_per_local_expert)
        return self.dispatcher.combine(y_sorted, state), state.num_dropped

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        routing = self.router(x)
        out, num_dropped = self._routed(x, routing)  # (N, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)

        tokens_per_expert = torch.bincount(routing.experts.flatten(), minlength=self.num_experts)
        stats = MoEStats(
            aux_loss=load_balancing_loss(routing.probs, tokens_per_expert, self.top_k),
            z_loss=router_z_loss(routing.logits),
            tokens_per_expert=tokens_per_expert.detach(),
            dropped=num_dropped,
        )
        return out.view(shape), stats
