"""Everything that turns the single-device model into the one this run trains, applied from
outside in one place: expert parallelism, then compile, then activation checkpointing.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_train.config import TrainerConfig
from moe_train.model import Transformer
from moe_train.parallel.expert_parallel import apply_expert_parallel
from moe_train.parallel.topology import Topology


def parallelize(model: Transformer, trainer: TrainerConfig, topology: Topology) -> None:
    """In place; state-dict keys unchanged. Compile comes before checkpointing because the routed
    experts stay eager (torch.compiler.disable): inside a checkpointed region that graph break
    would make the whole block fall back to eager, so the checkpoint wraps the compiled block."""
    apply_expert_parallel(model, topology)
    model.to(topology.device)
    if trainer.compile:
        apply_compile(model)
    if trainer.activation_checkpointing:
        apply_activation_checkpointing(model)


def apply_compile(model: Transformer) -> None:
    """torch.compile each transformer block (the layers' and the multi-token prediction depths')."""
    for block in model.blocks:
        block.forward = torch.compile(block.forward)


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each layer's (and each multi-token prediction depth's) activations in backward
    instead of keeping them (non-reentrant torch.utils.checkpoint), in training only."""
    for unit in (*model.layers, *model.mtp):
        unit.forward = _checkpointed(unit, unit.forward)


def _checkpointed(unit: nn.Module, forward):
    @functools.wraps(forward)
    def run(*args):
        if unit.training:
            return checkpoint(forward, *args, use_reentrant=False)
        return forward(*args)

    return run
