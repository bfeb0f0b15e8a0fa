"""Everything that turns the single-device model into the one this run trains, applied from
outside in one place: expert parallelism, compile, activation checkpointing, FSDP; then each rank
materialises and initialises its own shards of a model built on the meta device.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.utils.checkpoint import checkpoint

from moe_train.config import Config
from moe_train.config.training import ZERO_BUBBLE_SCHEDULES
from moe_train.model import DocumentPacking, Transformer
from moe_train.model.moe import is_expert_param
from moe_train.parallel.expert_parallel import apply_expert_parallel
from moe_train.parallel.fsdp import apply_fsdp, local_tensor
from moe_train.parallel.pipeline import Stage, build_stages
from moe_train.parallel.topology import Topology


def parallelize(
    model: Transformer,
    config: Config,
    topology: Topology,
    bf16: bool,
    documents: DocumentPacking | None = None,
) -> list[Stage]:
    """In place; state-dict keys unchanged. With pipeline parallelism the model first keeps only
    its rank's stages (returned, one module each; none without). Compile comes before
    checkpointing: on one device a block compiles whole, but with expert parallelism its dispatch
    and combine stay eager (the exchange's sizes are read on the host), and a graph break inside a
    checkpointed region would make the whole block fall back to eager, so the checkpoint wraps the
    compiled block. FSDP shards the native engine's model over each stage's ranks (DeepSpeed
    shards its own way)."""
    stages = build_stages(model, config, topology, documents) if topology.pp > 1 else []
    apply_expert_parallel(model, topology)
    if compile_wanted(config, topology.device):
        apply_compile(model, fullgraph=topology.ep == 1)
    if config.trainer.activation_checkpointing:
        apply_activation_checkpointing(model)
    if topology.data_parallel and config.engine.name == "native":
        apply_fsdp(model, config.parallel, topology, bf16, stages)
    return stages


def compile_wanted(config: Config, device: torch.device) -> bool:
    """trainer.compile, null meaning on a GPU only, and not with the zero-bubble pipeline schedules
    (their split backward cannot run a compiled block's)."""
    if config.trainer.compile is not None:
        return config.trainer.compile
    p = config.parallel
    return device.type == "cuda" and not (p.pp > 1 and p.pp_schedule in ZERO_BUBBLE_SCHEDULES)


def apply_compile(model: Transformer, fullgraph: bool) -> None:
    """torch.compile each transformer block (the layers' and the multi-token prediction depths').
    `fullgraph`: a graph break is an error, not a silent fall back to eager for part of a block."""
    for block in model.blocks:
        block.forward = torch.compile(block.forward, fullgraph=fullgraph)


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each layer's (and each multi-token prediction depth's) activations in backward
    instead of keeping them (non-reentrant torch.utils.checkpoint), in training only."""
    for unit in (*model.layers.values(), *model.mtp):
        unit.forward = _checkpointed(unit, unit.forward)


def _checkpointed(unit: nn.Module, forward):
    @functools.wraps(forward)
    def run(*args):
        if unit.training:
            return checkpoint(forward, *args, use_reentrant=False)
        return forward(*args)

    return run


@torch.no_grad()
def materialize(model: Transformer, seed: int, topology: Topology) -> None:
    """Allocate this rank's shards of a model built on the meta device and initialise them: each
    holds the rows of the whole parameter that it stands for (Transformer.initial_values), so the
    weights at step 0 are the same whatever the layout."""
    model.to_empty(device=topology.device)
    num_experts = model.config.moe.num_experts
    for name, p in model.named_parameters():
        local = local_tensor(p)
        rows, columns = _slice(p, 0), _slice(p, 1)
        shape = p.shape
        if is_expert_param(name):  # this rank's experts are a block of all of them
            first = topology.ep_rank * (num_experts // topology.ep)
            rows, shape = range(first + rows.start, first + rows.stop), (num_experts, *p.shape[1:])
        values = model.initial_values(name, shape, rows, seed)
        local.copy_(values if p.ndim < 2 else values[:, columns.start : columns.stop])
    model.init_buffers()


def _slice(p: torch.Tensor, dim: int) -> range:
    """The part of dim `dim` this rank holds of p (FSDP cuts as torch.chunk does)."""
    n = p.shape[dim] if dim < p.ndim else 1
    start, stop = 0, n
    if isinstance(p, DTensor):
        for axis, placement in enumerate(p.placements):
            if isinstance(placement, Shard) and placement.dim == dim:
                size, index = p.device_mesh.size(axis), p.device_mesh.get_local_rank(axis)
                chunk = -(-(stop - start) // size)
                start, stop = min(start + index * chunk, stop), min(start + (index + 1) * chunk, stop)
    return range(start, stop)
