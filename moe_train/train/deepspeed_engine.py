"""engine=deepspeed: the same run with DeepSpeed's ZeRO-1/2 sharding the optimizer states.

What DeepSpeed does here: the optimizer states (and, at stage 2, the gradients) are partitioned
over the data-parallel ranks, optionally kept on the CPU (ZeRO-Offload), gradients are reduced and
clipped by its engine, and checkpoints are DeepSpeed checkpoints. What stays ours: the model, its
expert-parallel all-to-all, the data, the schedule, metrics and callbacks.

Expert parameters are marked the way DeepSpeed marks its own MoE layers' (`allreduce=False`,
`group_name="ep_size_<ep>"`), put in their own optimizer groups, and DeepSpeed's expert groups are
created from the same rank layout as our (edp, ep) mesh: ZeRO then reduces and partitions expert
states over the expert-data-parallel ranks and dense states over the world.

DeepSpeed (0.19.8, pinned) recognises an MoE model only by the class of its MoE layers (its own
`deepspeed.moe.layer.MoE`), so `_MoEAwareEngine` tells it, and writes/reads our stacked expert
weights in DeepSpeed's per-expert checkpoint files (`layer_L_expert_E_mp_rank_00_model_states.pt`,
keys `<layer>.experts.w13.<E>`, the layout DeepSpeed's AutoEP uses for stacked experts).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import deepspeed
import deepspeed.runtime.engine
import torch
import torch.distributed as dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups
from torch import nn

from moe_train.config import Config, ConfigError, check_zero_stage
from moe_train.model.moe import MoE
from moe_train.parallel.data_parallel import is_expert_param
from moe_train.parallel.topology import Topology
from moe_train.train.checkpoint import load_config
from moe_train.train.engine import tensor_bytes
from moe_train.train.optim import param_groups

logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would drown our metrics

# Keys of a user's DeepSpeed JSON that our config already sets: they must agree with it.
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(config: Config, micro_batches: int, bf16: bool) -> dict:
    """The DeepSpeed configuration our config implies, with the user's JSON (engine.deepspeed_config)
    merged over it. Anything that would change the run (batch sizes, the optimizer) must agree."""
    t, e = config.trainer, config.engine
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": {
            "stage": e.zero_stage,
            "offload_optimizer": {"device": "cpu" if e.offload_optimizer else "none"},
        },
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,  # our callbacks log
        "wall_clock_breakdown": False,
    }
    if not e.deepspeed_config:
        return ds
    path = Path(e.deepspeed_config)
    try:
        user = json.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"engine.deepspeed_config={path}: cannot read it ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"engine.deepspeed_config={path} is not valid JSON: {err}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"engine.deepspeed_config={path} must hold a JSON object")
    for key in _BATCH_KEYS:
        if key in user and user[key] != ds[key]:
            raise ConfigError(
                f"engine.deepspeed_config={path} sets {key}={user[key]}, but the run has {key}={ds[key]} "
                f"(trainer.global_batch_size={t.global_batch_size}, trainer.micro_batch_size="
                f"{t.micro_batch_size}); set the batch in trainer.* and leave it out of the JSON"
            )
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ConfigError(
                f"engine.deepspeed_config={path} has an '{key}' section; the optimizer and schedule come "
                "from optim.* (AdamW, warmup + cosine), so both engines train the same run: remove it"
            )
    ds = _merge(ds, user)
    check_zero_stage(ds["zero_optimization"].get("stage", 0), f"{path}: zero_optimization.stage")
    return ds


def _expert_group_name(ep: int) -> str:
    return f"ep_size_{ep}"


def _init_distributed(topology: Topology) -> None:
    """DeepSpeed's communication layer over our process group (a world of one on one process)."""
    os.environ.setdefault("LOCAL_RANK", str(topology.local_rank))  # absent on one process or under SLURM
    if not dist.is_initialized():
        backend = "nccl" if topology.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)


def _create_expert_groups(topology: Topology) -> str:
    """DeepSpeed's expert / expert-data-parallel groups for our ep, checked against our mesh."""
    name = _expert_group_name(topology.ep)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(topology.ep)
    if topology.mesh is not None:
        ours = (topology.ep_group, topology.edp_group)
        theirs = (groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name))
        for a, b in zip(ours, theirs):
            if dist.get_process_group_ranks(a) != dist.get_process_group_ranks(b):
                raise RuntimeError("DeepSpeed's expert groups do not match the (edp, ep) mesh")
    return name


class ZeroEngine:
    """DeepSpeed's engine driven like the native one: backward per micro-batch, step per batch."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, config: Config, topology: Topology, micro_batches: int, bf16: bool):
        _init_distributed(topology)
        self.topology = topology
        self.config = deepspeed_config(config, micro_batches, bf16)
        expert_params = [p for n, p in model.named_parameters() if is_expert_param(n)]
        expert_group = _create_expert_groups(topology) if expert_params else None
        for p in expert_params:  # marked as DeepSpeed marks its own experts (deepspeed.moe.experts)
            p.allreduce = False
            p.group_name = expert_group
        optim_groups = param_groups(model, config.optim)
        if expert_params:
            optim_groups = split_params_into_different_moe_groups_for_optimizer(optim_groups)
        self.engine = _MoEAwareEngine(
            args=None,
            model=model,
            optimizer=self._optimizer(optim_groups, config),
            config=self.config,
            config_class=deepspeed.DeepSpeedConfig(self.config),
            expert_group=expert_group,
        )
        self.optimizer = self.engine.optimizer
        self.micro_batches = micro_batches
        self._micro = 0

    def _optimizer(self, groups: list[dict], config: Config) -> torch.optim.Optimizer:
        o = config.optim
        kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        if self.config["zero_optimization"]["offload_optimizer"].get("device", "none") == "none":
            return torch.optim.AdamW(groups, **kwargs)
        try:  # ZeRO-Offload steps on the CPU with DeepSpeed's own Adam (a C++ op built on first use)
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        except Exception as err:  # noqa: BLE001 - the op's build fails in many ways
            raise ConfigError(
                "engine.offload_optimizer=true needs DeepSpeed's CPU Adam (the cpu_adam op), which could "
                f"not be built here: {str(err).strip().splitlines()[0] if str(err).strip() else err!r}"
            ) from None

    def backward(self, loss: torch.Tensor) -> None:
        """`loss` is this micro-batch's mean; DeepSpeed divides it by the accumulation steps."""
        self.engine.backward(loss)
        self._micro += 1
        if self._micro < self.micro_batches:
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-batch

    def step(self, lr: float) -> float:
        """The optimizer step at the end of the batch; returns the gradient norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        self._micro = 0
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def optimizer_state_bytes(self) -> dict[str, int]:
        """This rank's optimizer memory, from its tensors: Adam's moments of the rank's partition,
        and the fp32 master copy of that partition ZeRO keeps beside the model's parameters."""
        zero = self.optimizer
        inner = getattr(zero, "optimizer", zero)  # the torch optimizer ZeRO wraps
        moments = tensor_bytes(t for state in inner.state.values() for t in state.values())
        master = tensor_bytes(getattr(zero, "single_partition_of_fp32_groups", []))
        return {"moments": moments, "master_weights": master}

    def save(self, folder: Path, progress: dict) -> None:
        self.engine.save_checkpoint(
            str(folder.parent), tag=folder.name, client_state=progress, save_latest=False
        )

    def load(self, folder: Path, progress: dict) -> dict:
        """Restore model, optimizer partitions in place (same world size and ep as when saved)."""
        saved_ep = load_config(folder).parallel.ep
        if saved_ep != self.topology.ep:  # a changed world size is refused by DeepSpeed's own check
            raise ConfigError(
                f"DeepSpeed checkpoint {folder} was written with parallel.ep={saved_ep} and resumes only "
                f"at that layout (this run: parallel.ep={self.topology.ep}); to change it, start from its "
                "weights with trainer.init_from"
            )
        try:
            _, client_state = self.engine.load_checkpoint(
                str(folder.parent),
                tag=folder.name,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
        except (RuntimeError, AssertionError, FileNotFoundError, KeyError, ValueError) as err:
            raise ConfigError(
                f"cannot resume from DeepSpeed checkpoint {folder}: {_first_line(err)}"
            ) from None
        if client_state is None:
            raise ConfigError(
                f"cannot resume from DeepSpeed checkpoint {folder}: DeepSpeed could not read it"
            )
        return {k: client_state[k] for k in progress}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _moe_layers(module: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, MoE)]


class _MoEAwareEngine(deepspeed.runtime.engine.DeepSpeedEngine):
    """DeepSpeed's engine, told that our MoE layers are MoE layers, with their stacked expert
    weights saved as DeepSpeed's per-expert files (overrides of five DeepSpeed 0.19 methods)."""

    def __init__(self, *args, expert_group: str | None, **kwargs):
        self._expert_group = expert_group  # None: a dense model
        super().__init__(*args, **kwargs)

    def _configure_distributed_model(self, model):
        super()._configure_distributed_model(model)
        if self._expert_group:  # DeepSpeed finds MoE layers by class; its ZeRO optimizer is built next
            self.has_moe_layers = True
            self.num_experts = [m.num_experts for _, m in _moe_layers(self.module)]

    def _get_non_moe_state_dict(self, full_state_dict):
        return {k: v for k, v in full_state_dict.items() if not is_expert_param(k)}

    def _expert_files(self, save_dir, tag):
        """(layer prefix, stacked weights' module, [(local index, global index, file)]) per MoE layer."""
        ep_rank = groups._get_expert_parallel_rank(self._expert_group)
        for layer_id, (prefix, moe) in enumerate(_moe_layers(self.module)):
            local = moe.experts.w2.shape[0]
            yield (
                prefix,
                moe.experts,
                [
                    (
                        e,
                        ep_rank * local + e,
                        self._get_expert_ckpt_name(save_dir, layer_id, ep_rank * local + e, tag),
                    )
                    for e in range(local)
                ],
            )

    def _save_moe_checkpoint(self, save_dir, tag, client_state=None, exclude_frozen_parameters=False):
        if groups._get_expert_data_parallel_rank(self._expert_group) == 0:  # one writer per expert shard
            for prefix, experts, files in self._expert_files(save_dir, tag):
                for e, g, path in files:
                    state = {
                        f"{prefix}.experts.{w}.{g}": stacked[e].detach().cpu().clone()
                        for w, stacked in experts.named_parameters()
                    }
                    self.checkpoint_engine.save(state, path)
        super()._save_moe_checkpoint(save_dir, tag, client_state, exclude_frozen_parameters)

    def load_checkpoint(self, load_dir, tag=None, **kwargs):
        self._loading = (load_dir, tag)
        return super().load_checkpoint(load_dir, tag=tag, **kwargs)

    def load_module_state_dict(self, checkpoint, strict=True, **kwargs):
        if self._expert_group:  # this rank's experts, stacked again from the per-expert files
            module = dict(checkpoint["module"])
            for prefix, experts, files in self._expert_files(*self._loading):
                loaded = [(g, self.checkpoint_engine.load(path, map_location="cpu")) for _, g, path in files]
                for w in dict(experts.named_parameters()):
                    module[f"{prefix}.experts.{w}"] = torch.stack(
                        [f[f"{prefix}.experts.{w}.{g}"] for g, f in loaded]
                    )
            checkpoint = {**checkpoint, "module": module}
        return super().load_module_state_dict(checkpoint, strict=strict, **kwargs)
