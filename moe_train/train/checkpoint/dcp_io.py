"""Reading and writing torch.distributed.checkpoint (DCP) folders: each rank its own shards, expert
shards presented as DTensors so that a checkpoint loads at any expert layout."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor

from moe_train.config import ConfigError, first_line
from moe_train.parallel.expert_parallel import expert_shards_to_dtensors
from moe_train.parallel.topology import Topology, named_collective

log = logging.getLogger(__name__)

# what dcp.save, dcp.load and async_save's writer thread warn on every call with no_dist=True
_SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


@contextlib.contextmanager
def single_process_quiet(no_dist: bool = True) -> Iterator[None]:
    """Around a DCP call on one process (no_dist), whose warning that it assumes one process says
    what we meant: silenced here only, leaving the process's warning filters as they were."""
    if not no_dist:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        yield


def dcp_save(state: dict, path: Path, topology: Topology, background: bool = False) -> Future | None:
    """Save `state` with DCP, each rank its own shards, expert shards presented as DTensors.

    background: copy the state into host memory, then return a Future that a background thread
    completes once the files are written (DCP's async_save; its collectives run on a group of
    their own). On rank 0 that also means every rank's files and the metadata are written."""
    state = expert_shards_to_dtensors(state, topology)
    no_dist = not topology.distributed
    if not background:
        with single_process_quiet(no_dist):
            dcp.save(state, checkpoint_id=path, no_dist=no_dist)
        return None
    if no_dist:
        # async_save warns on its own writer thread, after it returns, out of reach of a
        # catch_warnings here (which is not thread-safe either): this one filter is process-wide
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING, module=r"torch\.distributed")
    return dcp.async_save(
        _host_copy(state),
        checkpoint_id=path,
        process_group=topology.background_group(),
        async_stager=_AlreadyStaged(),
        no_dist=no_dist,
    )


def _host_copy(value):
    """A copy in host memory of a state dict that training goes on changing, keeping each tensor's
    kind: DTensors (expert shards) and ShardedTensors (ZeRO's fragments) around copied local data.
    Ours rather than DCP's own stager, which cannot copy DeepSpeed's fragments."""
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(v) for v in value)
    if isinstance(value, DTensor):
        local = _host_copy(value.to_local())
        return DTensor.from_local(
            local, value.device_mesh, value.placements, shape=value.shape, stride=value.stride()
        )
    if isinstance(value, ShardedTensor):
        shards = [Shard(_host_copy(s.tensor), s.metadata) for s in value.local_shards()]
        return ShardedTensor._init_from_local_shards_and_global_metadata(shards, value.metadata())
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return value


class _AlreadyStaged(AsyncStager):
    """async_save's stager for a state dict _host_copy made: nothing left to do."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def dcp_load(state: dict, path: Path, topology: Topology | None, weights_only: bool = False) -> dict:
    """Load `state` in place from a DCP checkpoint, presenting expert shards as DTensors; a load
    that does not fit this model becomes one line naming the first mismatch. Routing biases the
    checkpoint lacks keep their zeros. With `weights_only` (a new run, a fresh optimizer) whole
    multi-token prediction depths may differ: the model's that the checkpoint lacks keep their
    initialisation, the checkpoint's that the model lacks are left out."""
    distributed = topology is not None and topology.distributed
    try:
        stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        model = state.get("model", {})
        new_depths = dropped_depths = set()
        if weights_only:
            new_depths = _mtp_depths(model) - _mtp_depths(stored)
            dropped_depths = _mtp_depths(stored) - _mtp_depths(model)
            _log_depths(path, new_depths, dropped_depths)
        _refuse_weights_model_lacks(stored, _whole_model_keys(model, topology), dropped_depths)
        absent = {
            k: model.pop(k)
            for k in list(model)
            if f"model.{k}" not in stored and (k.endswith("router.expert_bias") or _depth_of(k) in new_depths)
        }
        loading = expert_shards_to_dtensors(state, topology) if topology is not None else state
        with single_process_quiet(not distributed):
            dcp.load(loading, checkpoint_id=path, no_dist=not distributed)
    except (Exception, CheckpointException) as e:  # another model's checkpoint, or a damaged one
        raise ConfigError(f"cannot load checkpoint {path} into this model: {reason(e)}") from e
    state = _loaded(loading, state)
    state["model"].update(absent)  # the routing biases and depths that start fresh
    return state


def _loaded(loading, original):
    """`original` with what DCP loaded: its tensors were filled in place (the DTensor views of
    expert shards share their memory), other values (numbers, lists) were replaced in `loading`."""
    if isinstance(loading, dict):
        return {k: _loaded(v, original[k]) if k in original else v for k, v in loading.items()}
    return original if isinstance(original, torch.Tensor) else loading


def _depth_of(key: str) -> int | None:
    """The multi-token prediction depth a state-dict key (with or without "model.") belongs to."""
    parts = key.removeprefix("model.").split(".", 2)
    return int(parts[1]) if parts[0] == "mtp" else None


def _mtp_depths(keys) -> set[int]:
    return {d for d in map(_depth_of, keys) if d is not None}


def _log_depths(path: Path, new: set[int], dropped: set[int]) -> None:
    if new:
        log.info("multi-token prediction depths %s are not in %s: they start from their initialisation",
                 sorted(new), path)  # fmt: skip
    if dropped:
        log.info(
            "multi-token prediction depths %s of %s are left out (model.mtp.num_layers)",
            sorted(dropped),
            path,
        )


def _whole_model_keys(model: dict, topology: Topology | None) -> set[str]:
    """The model's state-dict keys; with pipeline stages, those of every stage."""
    keys = set(model)
    if topology is not None and topology.pp > 1:
        stages: list = [None] * topology.pp
        with named_collective("all_gather_object (the stages' checkpoint keys)"):
            dist.all_gather_object(stages, keys, group=topology.pp_group)
        keys = set().union(*stages)
    return keys


def _refuse_weights_model_lacks(stored: dict, model: dict, dropped_depths: set[int]) -> None:
    """DCP loads the keys the model asks for and ignores the rest: a checkpoint of a deeper model,
    say, would load into a shallower one without a word. Refuse that, except for the whole
    multi-token prediction depths a new run leaves out. `stored`: the checkpoint's keys (its
    metadata)."""
    extra = sorted(
        k
        for k in stored
        if k.startswith("model.")
        and k.removeprefix("model.") not in model
        and _depth_of(k) not in dropped_depths
    )
    if extra:
        raise ConfigError(
            f"it holds {len(extra)} model tensors this model lacks, e.g. {extra[0].removeprefix('model.')} "
            "(a model.* setting differs from the checkpoint's config.yaml)"
        )


def underlying(error: BaseException) -> BaseException:
    """The error under DCP's wrapper: the first failing rank's (DCP gathers each rank's failure)."""
    if isinstance(error, CheckpointException) and error.failures:
        return next(iter(error.failures.values()))[0]
    return error


def reason(error: BaseException) -> str:
    """How a failed checkpoint read is quoted: the first line of the underlying error (DCP wraps
    each rank's failure), or what a file cut short means."""
    error = underlying(error)
    if isinstance(error, EOFError):
        return "one of its files ends too early (cut short or damaged)"
    return first_line(error)
