"""FSDP2 (torch's fully_shard) over the two meshes: each block's dense weights sharded over the
dense mesh (HSDP when it has replicas), its experts over their expert-data-parallel ranks; and the
global gradient norm across both.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from moe_train.config import ParallelConfig
from moe_train.model import Transformer
from moe_train.model.moe import is_expert_param
from moe_train.parallel.topology import Topology


def apply_fsdp(
    model: Transformer, config: ParallelConfig, topology: Topology, bf16: bool, stages: list | None = None
) -> None:
    """One FSDP unit per layer and per multi-token prediction depth (its experts a unit of their
    own, on the expert mesh), one for the embedding and one for the final norm and head (one for
    all three when they are tied), and the root; with expert parallelism each layer prefetches the
    next (forward) or the previous (backward) explicitly, as torchtitan does. Gradients are summed
    over each unit's ranks and divided by the world size once: every rank's loss is the mean over
    its share of the batch, and the experts' all-to-all already summed their gradients over `ep`.
    With pipeline stages (pipeline.Stage) each stage is a root over the ranks of its stage, and
    the model holds only what its stages need."""
    mp_policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.bfloat16 if bf16 and config.reduce_dtype == "bf16" else torch.float32,
    )

    def shard(modules, mesh: DeviceMesh, shard_axis: str, placement=None) -> None:
        fully_shard(
            modules,
            mesh=mesh,
            mp_policy=mp_policy,
            reshard_after_forward=config.reshard_after_forward,
            shard_placement_fn=placement,
        )
        for module in modules if isinstance(modules, list) else [modules]:
            module.set_gradient_divide_factor(float(topology.dp_size))
            # gloo has no PREMUL_SUM: sum, then divide once. Not where the shard group is one rank:
            # there FSDP (torch 2.13) divides its copy of the gradient and then again after.
            if topology.device.type != "cuda" and mesh[shard_axis].size() > 1:
                module.set_force_sum_reduction_for_comms(True)

    # without replicas the dense mesh's replicate axis has one rank: FSDP on the 1-D shard mesh,
    # not HSDP, which would all-reduce every unit's gradients over that one rank
    dense = (
        topology.dense_mesh
        if topology.dense_mesh["dp_replicate"].size() > 1
        else topology.dense_mesh["dp_shard"]
    )
    for unit in (*model.layers.values(), *model.mtp):
        block = getattr(unit, "block", unit)  # an MTP depth's block
        if block.is_moe:
            edp = topology.expert_mesh["edp"]
            placement = Shard(expert_shard_dim(block.ffn.experts.num_experts // topology.ep, edp.size()))
            shard(block.ffn.experts, edp, "edp", lambda param, placement=placement: placement)
        shard(unit, dense, "dp_shard")
    embedding = [model.tok_embeddings] if model.tok_embeddings is not None else []
    ends = [model.norm, model.output] if model.output is not None else []
    if model.config.tie_embeddings and embedding and ends:  # one weight: one unit
        shard([*embedding, *ends], dense, "dp_shard")
    else:
        for unit in (embedding, ends):
            if unit:
                shard(unit, dense, "dp_shard")
    roots = stages or [model]
    for root in roots:
        shard(root, dense, "dp_shard")
    if topology.ep > 1:  # the exchange's host sync would stall FSDP's implicit prefetching
        for root in roots:
            layers = list(
                root.layers.values() if isinstance(root.layers, torch.nn.ModuleDict) else root.layers
            )
            for layer, after in zip(layers, layers[1:]):
                layer.set_modules_to_forward_prefetch([after])
                after.set_modules_to_backward_prefetch([layer])


def expert_shard_dim(local_experts: int, edp: int) -> int:
    """The dim FSDP cuts a rank's (E/ep, ...) block of stacked experts along over its edp ranks:
    by expert (0) where they divide evenly, else dim 1 (torchtitan's choice too), where one rank
    would otherwise hold whole experts that another lacks."""
    return 0 if local_experts % edp == 0 else 1


def dense_and_expert_params(
    model: torch.nn.Module, skip: torch.nn.Parameter | None = None
) -> dict[bool, list[torch.nn.Parameter]]:
    """The trainable parameters by kind ({False: dense, True: expert}): they live on different
    meshes, so their norms are reduced apart (once, at engine set-up). `skip`: a copy of another
    pipeline stage's parameter, counted there."""
    groups: dict[bool, list[torch.nn.Parameter]] = {False: [], True: []}
    for name, p in model.named_parameters():
        if p.requires_grad and p is not skip:
            groups[is_expert_param(name)].append(p)
    return groups


@torch.no_grad()
def clip_grad_norm_(
    groups: dict[bool, list[torch.nn.Parameter]], max_norm: float, topology: Topology
) -> torch.Tensor:
    """Clip every gradient to a global norm of max_norm (0: no clipping); returns the norm before
    clipping. Dense and expert gradients (`groups`: dense_and_expert_params) live on different
    meshes, or are plain tensors on one process: each group's norm is reduced over its own mesh,
    the experts' also over `ep`, and each group is clipped apart by the one global coefficient."""
    groups = {expert: [p for p in params if p.grad is not None] for expert, params in groups.items()}
    total_sq = torch.zeros((), device=topology.device)
    for expert, params in groups.items():
        if not params:
            continue
        sq = get_total_norm([local_tensor(p.grad) for p in params]).float().square()
        reduce_over = _shard_groups(params[0].grad)  # the ranks holding other pieces of each
        if expert:
            reduce_over.append(topology.ep_group)
        for group in reduce_over:
            if group is not None and dist.get_world_size(group) > 1:
                topology.all_reduce(sq, group=group, what="gradient norm")
        total_sq += sq
    if topology.pp_group is not None:  # each stage holds other parameters
        topology.all_reduce(total_sq, group=topology.pp_group, what="gradient norm")
    total = total_sq.sqrt()
    if max_norm > 0:
        for params in groups.values():
            if params:
                clip_grads_with_norm_(params, max_norm, total)
    return total


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of t: a DTensor's local shard, or t itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _shard_groups(t: torch.Tensor) -> list:
    """The process groups over which a (FSDP) DTensor is split: its squared norm is their sum."""
    if not isinstance(t, DTensor):
        return []
    mesh = t.device_mesh
    return [mesh.get_group(axis) for axis, p in enumerate(t.placements) if isinstance(p, Shard)]
