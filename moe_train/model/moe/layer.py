"""The MoE layer: route -> dispatch -> experts -> combine, plus shared experts that every token
passes through. The dispatcher is an attribute that expert parallelism replaces from outside.

Shape legend: N tokens in the layer, D model dim, S rows the local experts compute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from moe_train.config import MoEConfig
from moe_train.model.layers import FeedForward
from moe_train.model.moe.dispatch import Dispatcher, LocalDispatcher
from moe_train.model.moe.experts import GroupedExperts
from moe_train.model.moe.router import MoEStats, Routing, TopKRouter


class MoE(nn.Module):
    """Routed experts plus optional shared experts, built from model.moe."""

    def __init__(self, config: MoEConfig, dim: int, hidden_dim: int):
        super().__init__()
        self.num_experts = config.num_experts
        self.router = TopKRouter(config, dim)
        self.experts = GroupedExperts(config.num_experts, dim, hidden_dim)
        # k shared SwiGLU experts of hidden F are exactly one SwiGLU of hidden k * F.
        shared = config.num_shared_experts
        self.shared_experts = FeedForward(dim, shared * hidden_dim) if shared else None
        self.dispatcher: Dispatcher = LocalDispatcher(
            config.num_experts, config.top_k, config.capacity_factor
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        """x (B, T, D) or (N, D) -> the same shape, and the router's statistics."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        routing = self.router(x)
        out, num_dropped = self._routed(x, routing)  # (N, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        num_sequences = shape[0] if len(shape) == 3 else 1  # (N, D) counts as one sequence
        return out.view(shape), self.router.stats(routing, num_sequences, num_dropped)

    def _routed(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        rows, counts, handle = self.dispatcher.dispatch(x, routing)  # (S, D) grouped by expert
        out = self.dispatcher.combine(self.experts(rows, counts), handle)  # (N, D)
        return out, handle.num_dropped


def moe_layers(model: nn.Module) -> list[MoE]:
    """The MoE layers of `model` in module order: the order of the router statistics."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def is_expert_param(name: str) -> bool:
    """Whether a parameter or state-dict name is a routed expert's weight (sharded by expert
    parallelism), as opposed to one every rank holds whole."""
    return ".experts." in f".{name}"


@contextlib.contextmanager
def dropless(model: nn.Module) -> Iterator[None]:
    """Every MoE layer of `model` routes every token (no capacity limit, whichever dispatcher it
    has): for sampling, as a model exported to Hugging Face does. A capacity factor is a
    training-time token budget."""
    dispatchers = [m.dispatcher for m in moe_layers(model)]
    factors = [d.capacity_factor for d in dispatchers]
    for d in dispatchers:
        d.capacity_factor = None
    try:
        yield
    finally:
        for d, factor in zip(dispatchers, factors):
            d.capacity_factor = factor
