"""Each step's expert load: the routed assignments per expert, summed over micro-batches and then
over ranks, which move the routing biases (auxiliary-loss-free balancing) and become metrics.
"""

from __future__ import annotations

import torch

from moe_train.config import MoEConfig
from moe_train.model import Transformer, moe_block_ids
from moe_train.model.moe import moe_layers
from moe_train.parallel.topology import Topology


class ExpertLoad:
    """Shape legend: L MoE layers (MTP depths' last), E experts."""

    def __init__(self, model: Transformer, config: MoEConfig, topology: Topology):
        self.routers = [layer.router for layer in moe_layers(model)]  # this rank's, in counts' order
        self.layer_ids = moe_block_ids(model.config)  # the whole model's (L): a pipeline stage holds some
        # this rank's among them, where its counts go (every row on one process)
        rows = [self.layer_ids.index(i) for i in model.moe_layer_ids]
        self.rows = torch.tensor(rows, dtype=torch.long, device=topology.device)
        self.config = config
        self.topology = topology
        self.reset()

    def reset(self) -> None:
        """At the start of a step."""
        self.tokens_per_expert: torch.Tensor | None = None  # (L, E)
        self.dropped: torch.Tensor | None = None  # (L,)
        self._reduced = False

    def add(self, tokens_per_expert: torch.Tensor | None, dropped: torch.Tensor | None) -> None:
        """Counts of this rank's MoE blocks (l, E) and drops (l,), of one micro-batch or summed
        over several (a dense model, or stage, has none)."""
        if tokens_per_expert is None:
            return
        counts, drops = tokens_per_expert.float(), dropped.float().to(self.topology.device)
        if len(self.rows) < len(self.layer_ids):  # a pipeline stage: the other stages' rows are 0
            counts = counts.new_zeros(len(self.layer_ids), counts.shape[1]).index_copy_(0, self.rows, counts)
            drops = drops.new_zeros(len(self.layer_ids)).index_copy_(0, self.rows, drops)
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
            for router, counts in zip(self.routers, self.tokens_per_expert[self.rows]):
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
