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
    weights: torch.Tensor  # (N, k) combine weights
    num_assignments: int  # N * k, before any capacity drop

    @property
    def num_dropped(self) -> int:
        return self.num_assignments - self.order.numel()


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
        order = flat_experts.argsort(stable=True)  # (N * k,)
        tokens_per_expert = torch.bincount(flat_experts, minlength=self.num_experts)  # (E,)
        capacity = self.capacity(x.shape[0])
        if capacity is not None:
            starts = tokens_per_expert.cumsum(0) - tokens_per_expert  # (E,) first sorted row of e
            rank_in_expert = torch.arange(order.numel(), device=x.device) - starts[flat_experts[order]]
            order = order[rank_in_expert < capacity]
            tokens_per_expert = tokens_per_expert.clamp(max=capacity)
        x_sorted = x[order // self.top_k]  # (S, D)
        state = DispatchState(order, routing.weights, flat_experts.numel())
        return x_sorted, tokens_per_expert, state

    def unpermute(self, y_sorted: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Inverse of permute: (S, D) expert outputs -> (N, D), the weighted sum over each token's k.
        One index_add of the weighted rows (dropped assignments add nothing): on the CPU it measured
        40% faster than scattering into (N, k, D) and summing, and it is deterministic there."""
        weights = state.weights.flatten()[state.order].to(y_sorted.dtype).unsqueeze(-1)  # (S, 1)
        out = y_sorted.new_zeros(state.num_assignments // self.top_k, y_sorted.shape[-1])  # (N, D)
        return out.index_add(0, state.order // self.top_k, y_sorted * weights)

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
        return self._forward_loop(x, tokens_per_expert)

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
