"""engine=deepspeed: the same run with DeepSpeed's ZeRO-1/2 partitioning the optimizer states
(and at stage 2 the gradients) over the data-parallel ranks; the model, its expert parallelism,
data, schedule and DCP checkpoints stay ours (docs/architecture.md says how they meet).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import deepspeed
import deepspeed.runtime.engine
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
from torch.utils import cpp_extension

from moe_train.config import Config, ConfigError, check_zero_stage, first_line
from moe_train.model.moe import is_expert_param, moe_layers
from moe_train.parallel.topology import Topology, default_group_timeout
from moe_train.train.checkpoint import dcp_load, dcp_save
from moe_train.train.engine import Engine, tensor_bytes
from moe_train.train.optim import param_groups


@contextlib.contextmanager
def _sharded_tensors_quietly() -> Iterator[None]:
    """ZeRO's fragments go to DCP as ShardedTensors (DTensor cannot hold uneven 1-D fragments);
    torch 2.13 (pinned) warns that they are deprecated each time it writes or reads them."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Please use DTensor instead and we are deprecating ShardedTensor"
        )
        yield


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
    # what our config owns: set there, it is recorded in each checkpoint's config.yaml
    for key, ours in (
        ("gradient_clipping", "optim.grad_clip"),
        ("bf16", "trainer.precision"),
        ("fp16", "trainer.precision (bf16 or fp32; fp16's loss scaling is not supported)"),
    ):
        if key in user:
            raise ConfigError(
                f"engine.deepspeed_config={path} sets {key}: set {ours} instead and leave it out"
            )
    if not isinstance(user.get("zero_optimization", {}), dict):
        raise ConfigError(
            f"engine.deepspeed_config={path}: zero_optimization must be an object, e.g. "
            '{"zero_optimization": {"stage": 2}}'
        )
    ds = _merge(ds, user)
    check_zero_stage(ds["zero_optimization"].get("stage", 0), f"{path}: zero_optimization.stage")
    return ds


def _expert_group_name(ep: int) -> str:
    return f"ep_size_{ep}"


STALE_BUILD_MINUTES = 10  # a first-use build of one of DeepSpeed's ops takes about a minute


def refuse_stale_build_locks() -> None:
    """DeepSpeed builds its ops on first use through torch's extension loader, which waits, without
    a bound, for the lock file of a build in progress: a build killed half-way leaves that lock
    and every later run would wait forever, silently. A lock older than any build is named."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        minutes = (time.time() - lock.stat().st_mtime) / 60
        if minutes > STALE_BUILD_MINUTES:
            raise ConfigError(
                f"{lock} is {minutes:.0f} minutes old: a build of DeepSpeed's {lock.parent.name} op was "
                "killed and left it; delete it (when no other run is building) and start again"
            )


def _init_distributed(topology: Topology) -> None:
    """DeepSpeed's communication layer over our process group (a world of one on one process)."""
    refuse_stale_build_locks()  # init_distributed builds its communication op
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
    if topology.expert_mesh is not None:
        ours = (topology.ep_group, topology.edp_group)
        theirs = (groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name))
        for a, b in zip(ours, theirs):
            if dist.get_process_group_ranks(a) != dist.get_process_group_ranks(b):
                raise RuntimeError("DeepSpeed's expert groups do not match the (edp, ep) mesh")
    return name


class ZeroEngine(Engine):
    """DeepSpeed's engine driven like the native one: backward per micro-batch, step per batch.

    Expert parameters are marked as DeepSpeed marks its own MoE layers' (`allreduce=False`,
    `group_name="ep_size_<ep>"`) and get their own optimizer groups, and DeepSpeed's expert groups
    are checked against our (edp, ep) mesh: ZeRO then reduces and partitions expert states over
    the expert-data-parallel ranks and dense states over the world."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, config: Config, topology: Topology, micro_batches: int, bf16: bool):
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would drown our metrics
        self.topology = topology
        self.config = deepspeed_config(config, micro_batches, bf16)
        expert_params = [p for n, p in model.named_parameters() if is_expert_param(n)]
        with default_group_timeout(topology.timeout):  # DeepSpeed makes its groups without one
            _init_distributed(topology)
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
        self._pre_step_hooks: list[Callable[[], None]] = []
        for module in model.modules():  # a bf16 engine casts buffers too; the routing bias stays fp32
            if getattr(module, "expert_bias", None) is not None:
                module.expert_bias = module.expert_bias.float()

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
                f"not be built here: {first_line(err)}"
            ) from None

    def backward(self, loss: torch.Tensor) -> None:
        """`loss` is this micro-batch's mean; DeepSpeed divides it by the accumulation steps."""
        self.engine.backward(loss)
        self._micro += 1
        if self._micro < self.micro_batches:
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-batch

    def register_step_pre_hook(self, hook: Callable[[], None]) -> None:
        self._pre_step_hooks.append(hook)

    def step(self, lr: float) -> float:
        """The optimizer step at the end of the batch; returns the gradient norm before clipping.
        The pre-step hooks run before it (ZeRO calls its inner optimizer once per parameter group,
        so they cannot hang off that)."""
        for hook in self._pre_step_hooks:
            hook()
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

    # ---- checkpoints: DCP, as the native engine's, with ZeRO's partitions as the shards ----

    def _linked_optimizer_state(self) -> None:
        """Adam's moments exist from the first step on; a fresh engine (one about to resume) gets
        zeroed ones here. Either way each parameter's fragment is then linked to its slice of them,
        as DeepSpeed links them after a step."""
        zero = self.optimizer
        inner = zero.optimizer
        for group in inner.param_groups:
            flat = group["params"][0]  # this rank's partition of the group, fp32
            state = inner.state[flat]
            if "exp_avg" not in state:
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(flat), torch.zeros_like(flat)
                state["step"] = 0 if _is_cpu_adam(inner) else torch.tensor(0.0)
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()

    def _state(self, progress: dict, master: bool) -> dict:
        """What a checkpoint holds: the model's weights as the native engine writes them, and Adam's
        moments (and with `master`, ZeRO's fp32 master weights) of each parameter as the flat fp32
        tensor they partition, each rank holding the fragments it owns (lp_fragment_address: the
        slice of the flattened parameter; experts offset by the ep rank's place in the stacked
        tensor). DCP stores every fragment once and reads them back into any other partitioning:
        another world size, ep or ZeRO stage."""
        self._linked_optimizer_state()
        topo, rank = self.topology, dist.get_rank()
        mine = {}  # name -> where this rank's fragment sits in the parameter's global flat tensor
        params = dict(self.engine.module.named_parameters())
        for name, param in params.items():
            mapping = getattr(param, "_hp_mapping", None)  # None: other ranks own all of it
            if mapping is not None:
                base = topo.ep_rank * param.numel() if is_expert_param(name) else 0
                at, device = mapping.lp_fragment_address, mapping.get_hp_fragment().device
                mine[name] = ShardMetadata([base + at.start], [at.numel], f"rank:{rank}/{device}")
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)  # one exchange for all tensors, not one per tensor
        keys = ("fp32", *_MOMENTS) if master else _MOMENTS
        optim: dict = {key: {} for key in keys}
        for name, param in params.items():
            total = param.numel() * (topo.ep if is_expert_param(name) else 1)
            metadata = ShardedTensorMetadata(
                [frags[name] for frags in everyone if name in frags],
                torch.Size([total]),
                TensorProperties(dtype=torch.float32),
            )
            for key in keys:
                local = []
                if name in mine:  # detached: the same memory, which a load fills in place
                    fragment = param._hp_mapping.get_hp_fragment(None if key == "fp32" else key).detach()
                    local.append(Shard(fragment, mine[name]))
                optim[key][name] = ShardedTensor._init_from_local_shards_and_global_metadata(local, metadata)
        step = next(iter(self.optimizer.optimizer.state.values()))["step"]
        optim["step"] = torch.tensor(float(step))
        model = {  # fp32 like the native engine's, whatever precision DeepSpeed keeps the module in
            k: v.float() if v.is_floating_point() else v for k, v in self.engine.module.state_dict().items()
        }
        return {"model": model, "optim": optim, "progress": progress}

    def save(self, folder: Path, progress: dict, background: bool = False) -> Future | None:
        # the master weights only where they are not the weights: a quarter of an fp32 run's checkpoint
        master = next(self.engine.module.parameters()).dtype != torch.float32
        with _sharded_tensors_quietly():
            return dcp_save(self._state(progress, master), folder, self.topology, background)

    def load(self, folder: Path, progress: dict) -> dict:
        """Restore weights, master weights and moments in place at any layout (world size, ep, ZeRO
        stage, offload); returns the saved `progress`. A checkpoint without master weights (an fp32
        run's) restores them from its fp32 weights."""
        saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
        master = any(k.startswith("optim.fp32.") for k in saved)  # a bf16 run's checkpoint
        with _sharded_tensors_quietly():
            state = dcp_load(self._state(progress, master), folder, self.topology)
        self.engine.module.load_state_dict(state["model"])
        if not master:
            self._master_from(state["model"])
        step = state["optim"]["step"].item()
        inner = self.optimizer.optimizer
        for group in inner.param_groups:
            inner.state[group["params"][0]]["step"] = int(step) if _is_cpu_adam(inner) else torch.tensor(step)
        self.engine.global_steps = int(state["progress"]["step"])
        return state["progress"]

    @torch.no_grad()  # each fragment is a view of ZeRO's fp32 partition, a leaf
    def _master_from(self, weights: dict) -> None:
        """Fill this rank's fragments of the fp32 master weights from fp32 `weights` (state-dict keys)."""
        for name, param in self.engine.module.named_parameters():
            mapping = getattr(param, "_hp_mapping", None)  # None: other ranks own all of it
            if mapping is not None:
                at = mapping.lp_fragment_address
                mapping.get_hp_fragment().copy_(weights[name].reshape(-1).narrow(0, at.start, at.numel))


_MOMENTS = ("exp_avg", "exp_avg_sq")  # per parameter in the checkpoint's "optim", with "fp32" in bf16 runs


def _is_cpu_adam(optimizer: torch.optim.Optimizer) -> bool:
    """DeepSpeed's CPU Adam (ZeRO-Offload) counts steps in an int; torch's AdamW in a tensor."""
    return type(optimizer).__name__ == "DeepSpeedCPUAdam"


class _MoEAwareEngine(deepspeed.runtime.engine.DeepSpeedEngine):
    """DeepSpeed's engine, told that our MoE layers are MoE layers (an override of one DeepSpeed
    0.19 method): it recognises only its own MoE class."""

    def __init__(self, *args, expert_group: str | None, **kwargs):
        self._expert_group = expert_group  # None: a dense model
        super().__init__(*args, **kwargs)

    def _configure_distributed_model(self, model):
        super()._configure_distributed_model(model)
        if self._expert_group:  # DeepSpeed finds MoE layers by class; its ZeRO optimizer is built next
            self.has_moe_layers = True
            self.num_experts = [m.num_experts for m in moe_layers(self.module)]
