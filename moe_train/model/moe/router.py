"""The top-k router and the losses that balance it (Switch/GShard aux, DeepSeek's device-level and
sequence-wise, ST-MoE's z-loss), computed from one layer's routing decision.

Shape legend: N tokens, E experts, k top-k, G expert groups, B sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moe_train.config import MoEConfig


@dataclass
class Routing:
    """One MoE layer's routing decision for N tokens."""

    logits: torch.Tensor  # (N, E) fp32
    probs: torch.Tensor  # (N, E) fp32, rows sum to 1: the softmax, or the sigmoid scores normalised
    experts: torch.Tensor  # (N, k) int64 expert ids
    weights: torch.Tensor  # (N, k) fp32 combine weights


@dataclass
class MoEStats:
    """Per-layer, per-micro-batch router statistics (reduced across ranks in the trainer)."""

    aux_loss: torch.Tensor  # scalar, differentiable
    device_aux_loss: torch.Tensor  # scalar, differentiable: the same over the groups of experts
    z_loss: torch.Tensor  # scalar, differentiable
    tokens_per_expert: torch.Tensor  # (E,) routed assignments before any drop, detached
    dropped: torch.Tensor  # () assignments dropped by the capacity limit


class TopKRouter(nn.Module):
    """Linear gate, a score per expert (softmax, or DeepSeek-V3's sigmoid), top-k.

    The routing bias (auxiliary-loss-free balancing) is added for the choice only: it steers which
    experts a token goes to, not how much each contributes. Group-limited routing picks the
    `topk_groups` best groups first, so that a token travels to at most that many ranks."""

    def __init__(self, config: MoEConfig, dim: int):
        super().__init__()
        self.gate = nn.Linear(dim, config.num_experts, bias=False)
        self.num_experts, self.top_k = config.num_experts, config.top_k
        self.renormalize = config.renormalize
        self.sigmoid = config.score_function == "sigmoid"
        self.num_groups, self.topk_groups = config.num_expert_groups, config.topk_groups
        self.scaling_factor = config.routed_scaling_factor
        self.aux_loss_scope = config.aux_loss_scope
        # a buffer: checkpointed with the model, never seen by the optimizer
        bias = torch.zeros(config.num_experts) if config.bias_update_rate > 0 else None
        self.register_buffer("expert_bias", bias)

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
        # the balancing losses see sigmoid scores normalised to sum to 1, as Megatron-Core's
        probs = scores / scores.sum(dim=-1, keepdim=True) if self.sigmoid else scores
        return Routing(logits, probs, experts, weights)

    def _only_top_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """choice (N, E) with -inf outside each token's topk_groups best groups, ranked by the sum
        of their top k / topk_groups scores (Megatron-Core's group_limited_topk)."""
        grouped = choice.view(choice.shape[0], self.num_groups, -1)  # (N, G, E / G)
        group_scores = grouped.topk(self.top_k // self.topk_groups, dim=-1).values.sum(dim=-1)  # (N, G)
        top = group_scores.topk(self.topk_groups, dim=-1).indices  # (N, M)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top, True)  # (N, G)
        return grouped.masked_fill(~keep.unsqueeze(-1), -math.inf).view_as(choice)

    def stats(self, routing: Routing, num_sequences: int, dropped: torch.Tensor) -> MoEStats:
        """The balancing losses of this routing over `num_sequences` sequences of equal length."""
        tokens_per_expert = count(routing.experts.flatten(), self.num_experts)
        if self.aux_loss_scope == "sequence":
            probs = routing.probs.view(num_sequences, -1, self.num_experts)
            experts = routing.experts.view(num_sequences, -1)
            aux_loss = sequence_balancing_loss(probs, experts, self.top_k)
        else:
            aux_loss = load_balancing_loss(routing.probs, tokens_per_expert, self.top_k)
        if self.num_groups > 1:
            device_aux_loss = load_balancing_loss(
                routing.probs, tokens_per_expert, self.top_k, self.num_groups
            )
        else:  # one group holds every assignment and all probability: the loss is the constant 1
            device_aux_loss = aux_loss.new_ones(())
        return MoEStats(
            aux_loss=aux_loss,
            device_aux_loss=device_aux_loss,
            z_loss=router_z_loss(routing.logits),
            tokens_per_expert=tokens_per_expert.detach(),
            dropped=dropped,
        )

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor, rate: float) -> None:
        """Move the bias by `rate` toward balance, from one step's assignments per expert (E,),
        counted over the whole global batch so that every rank moves it alike."""
        counts = tokens_per_expert.to(self.expert_bias)
        self.expert_bias += rate * torch.sign(counts.mean() - counts)


def count(values: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) int64: how often each of 0 .. n-1 occurs in `values`. bincount's output length depends
    on the values (a graph break under torch.compile); this one's does not."""
    return values.new_zeros(n, dtype=torch.int64).scatter_add_(0, values, torch.ones_like(values))


def load_balancing_loss(
    probs: torch.Tensor, tokens_per_expert: torch.Tensor, top_k: int, num_groups: int | None = None
) -> torch.Tensor:
    """Switch/GShard auxiliary loss sum_e f_e * P_e, normalised so balanced routing gives 1.0.

    f_e = E * (share of the N * k assignments that went to expert e), 1 when balanced (not
    differentiable); P_e the mean router probability of expert e (differentiable); Megatron-Core's
    normalisation. With num_groups G, DeepSeekMoE's device-level loss over G groups of consecutive
    experts: sum_g mean_{e in g}(f_e) * sum_{e in g}(P_e), also 1.0 when the groups are balanced.
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
