"""Each step's expert load: the routed assignments per expert, summed over micro-batches and then
over ranks, which move the routing biases (auxiliary-loss-free balancing) and become metrics.
"""

from __future__ import annotations

import torch

from moe_train.config import MoEConfig
from moe_train.model import ModelOutput, Transformer
from moe_train.model.moe import moe_layers
from moe_train.parallel.topology import Topology


class ExpertLoad:
    """Shape legend: L MoE layers (MTP depths' last), E experts."""

    def __init__(self, model: Transformer, config: MoEConfig, topology: Topology):
        self.routers = [layer.router for layer in moe_layers(model)]  # in the order of the counts
        self.layer_ids = model.moe_layer_ids
        self.config = config
        self.topology = topology
        self.reset()

    def reset(self) -> None:
        """At the start of a step."""
        self.tokens_per_expert: torch.Tensor | None = None  # (L, E)
        self.dropped: torch.Tensor | None = None  # (L,)
        self._reduced = False

    def add(self, out: ModelOutput) -> None:
        """One micro-batch's counts (a dense model has none)."""
        if out.tokens_per_expert is None:
            return
        counts, drops = out.tokens_per_expert.float(), out.dropped.to(self.topology.device)
        self.tokens_per_expert = counts if self.tokens_per_expert is None else self.tokens_per_expert + counts
        self.dropped = drops if self.dropped is None else self.dropped + drops

    def _reduce(self) -> None:
        """Sum over the ranks, once per step: the global batch's counts, the same on every rank."""
        if not self._reduced and self.tokens_per_expert is not None:
            self.topology.all_reduce(self.tokens_per_expert, what="expert counts")
            self.topology.all_reduce(self.dropped, what="expert counts")
            self._reduced = True

    def update_routing_bias(self) -> None:
        """Each router's bias moves toward the global batch's mean load (model.moe.bias_update_rate):
        registered as an engine step-pre hook, so it happens once per optimizer step."""
        self._reduce()
        if self.tokens_per_expert is not None:
            for router, counts in zip(self.routers, self.tokens_per_expert):
                router.update_bias(counts, self.config.bias_update_rate)

    def metrics(self) -> dict:
        """Per MoE layer: each expert's share of the assignments, max / mean load, and with a
        capacity factor the share of assignments dropped."""
        self._reduce()
        if self.tokens_per_expert is None:
            return {}
        total = self.tokens_per_expert.sum(dim=1)  # (L,)
        load = self.tokens_per_expert / total.unsqueeze(1)  # (L, E)
        imbalance = load.max(dim=1).values / load.mean(dim=1)  # (L,)
        dropped_frac = self.dropped / total  # (L,)
        metrics = {}
        for i, layer in enumerate(self.layer_ids):
            metrics[f"expert_load/layer_{layer}"] = [round(v, 5) for v in load[i].tolist()]
            metrics[f"load_imbalance/layer_{layer}"] = imbalance[i].item()
            if self.config.capacity_factor is not None:
                metrics[f"dropped_frac/layer_{layer}"] = dropped_frac[i].item()
        return metrics
