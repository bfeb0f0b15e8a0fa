"""Atomic checkpoint folders of torch.distributed.checkpoint (DCP): sharded, reshardable.

Layout: out_dir/checkpoints/step_00000100/ holds DCP's shards and .metadata (the model's weights under
"model", the engine's optimizer state under "optim", the data position and RNG under "progress")
and config.yaml.
Each rank writes only its own files into step_XXXXXXXX.tmp; rank 0 writes config.yaml and renames
the folder once every rank has finished, so a folder without the .tmp suffix is always complete, and
a crash mid-save leaves only a .tmp folder that resume ignores and the next run deletes.

Either engine writes the same "model" entries, so weights load alike from every checkpoint
(load_weights, load_model: the tools and trainer.init_from); the optimizer state resumes only under
the engine that wrote it (config.yaml says which).
"""

from __future__ import annotations

import fcntl
import json
import logging
import operator
import os
import re
import shutil
import socket
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor

from moe_train.config import Config, ConfigError, ModelConfig
from moe_train.parallel.expert_parallel import expert_shards_to_dtensors
from moe_train.parallel.topology import Topology

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class Progress:
    """Counters that a resumed run continues from."""

    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # global training sequences read (the data position)


def is_complete(path: Path) -> bool:
    """A renamed step folder; config.yaml is written last, after every rank's files."""
    return _STEP_DIR.match(path.name) is not None and (path / "config.yaml").is_file()


def load_config(checkpoint: str | Path) -> Config:
    """The configuration a checkpoint was written with."""
    checkpoint = Path(checkpoint)
    if not ((checkpoint / "config.yaml").is_file() and (checkpoint / ".metadata").is_file()):
        raise ConfigError(
            f"{checkpoint} is not a moe_train checkpoint (a folder with config.yaml and DCP's .metadata)"
        )
    schema = OmegaConf.structured(Config)
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(checkpoint / "config.yaml")))
    except ConfigError:
        raise
    except Exception as e:  # YAML that does not parse, or keys / values the schema refuses
        raise ConfigError(f"{checkpoint / 'config.yaml'} is damaged: {_reason(e)}") from None


def dcp_save(state: dict, path: Path, topology: Topology, background: bool = False) -> Future | None:
    """Save `state` with DCP, each rank its own shards, expert shards presented as DTensors.

    background: copy the state into host memory, then return a Future that a background thread
    completes once the files are written (DCP's async_save; its collectives run on a group of
    their own). On rank 0 that also means every rank's files and the metadata are written."""
    state = expert_shards_to_dtensors(state, topology)
    no_dist = not topology.distributed
    if not background:
        dcp.save(state, checkpoint_id=path, no_dist=no_dist)
        return None
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
        _refuse_weights_model_lacks(stored, model, dropped_depths)
        absent = {
            k: model.pop(k)
            for k in list(model)
            if f"model.{k}" not in stored and (k.endswith("router.expert_bias") or _depth_of(k) in new_depths)
        }
        if topology is not None:
            state = expert_shards_to_dtensors(state, topology)
        dcp.load(state, checkpoint_id=path, no_dist=not distributed)
    except (Exception, CheckpointException) as e:  # another model's checkpoint, or a damaged one
        raise ConfigError(f"cannot load checkpoint {path} into this model: {_reason(e)}") from e
    if topology is not None:
        state = expert_shards_to_dtensors(state, topology, inverse=True)
    state["model"].update(absent)  # the routing biases and depths that start fresh
    return state


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


# the model.* settings a checkpoint's tensors are shaped by (the rest may change on resume)
ARCHITECTURE = (
    "vocab_size",
    "dim",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "ffn_hidden_dim",
    "tie_embeddings",
    "moe.num_experts",
    "moe.num_shared_experts",
    "moe.expert_hidden_dim",
    "moe.first_k_dense",
    "moe.every_n_layers",
    "mla.kv_lora_rank",
    "mla.q_lora_rank",
    "mla.qk_nope_head_dim",
    "mla.qk_rope_head_dim",
    "mla.v_head_dim",
    "mtp.num_layers",
)


class CheckpointMismatch(ConfigError):
    """The checkpoint is not this run's kind (another engine, another architecture): unlike a
    damaged one, no other checkpoint of the same run would fit either."""


def _refuse_other_architecture(path: Path, saved: ModelConfig, model: ModelConfig) -> None:
    """Resuming keeps the architecture: name the first setting that shapes a tensor and differs."""
    for key in ARCHITECTURE:
        # an unset expert size is the dense FFN's: compare what it resolves to
        get = (
            ModelConfig.expert_hidden_dim.fget if key == "moe.expert_hidden_dim" else operator.attrgetter(key)
        )
        theirs, ours = get(saved), get(model)
        if theirs != ours:
            hint = (
                ", or add or drop depths in a new run started from it (trainer.init_from)"
                if key == "mtp.num_layers"
                else ""
            )
            raise CheckpointMismatch(
                f"checkpoint {path} has model.{key}={json.dumps(theirs)} but this run asks for "
                f"model.{key}={json.dumps(ours)}: resume with the checkpoint's value{hint}"
            )


def load_weights(path: str | Path, model: nn.Module, topology: Topology | None = None) -> None:
    """Model weights only, from a training checkpoint or a weights-only one, at any expert layout."""
    path = Path(path)
    load_config(path)  # checks it is a checkpoint
    state = dcp_load({"model": model.state_dict()}, path, topology, weights_only=True)
    model.load_state_dict(state["model"])


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run directory (its newest complete checkpoint)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        found = sorted((p for p in (path / "checkpoints").iterdir() if is_complete(p)), key=lambda p: p.name)
        if not found:
            raise ConfigError(f"run directory {path} has no complete checkpoint")
        return found[-1]
    return path


def load_model(path: str | Path) -> tuple[Config, nn.Module]:
    """The config and model (CPU, fp32, one process) of a checkpoint or run directory."""
    from moe_train.model import Transformer

    path = resolve_checkpoint(path)
    config = load_config(path)
    model = Transformer(config.model)
    load_weights(path, model)
    return config, model


def save_weights(config: Config, model: nn.Module, path: str | Path) -> Path:
    """A weights-only checkpoint from one process (what the tools write and trainer.init_from reads),
    written aside and renamed, never over an existing folder."""
    path = Path(path)
    if path.exists():
        raise ConfigError(f"{path} already exists; choose another output folder")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        dcp.save({"model": model.state_dict()}, checkpoint_id=tmp, no_dist=True)
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _reason(error: BaseException) -> str:
    """The first line of the underlying error (DCP wraps each rank's failure)."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    if isinstance(error, EOFError):
        return "one of its files ends too early (cut short or damaged)"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Checkpointer:
    def __init__(self, out_dir: str | Path, topology: Topology, keep_last: int, background: bool = False):
        self.dir = Path(out_dir) / "checkpoints"
        self.topology = topology
        self.keep_last = keep_last
        self.background = background
        self._in_flight: tuple[Future | None, Path, str] | None = None  # a save not yet complete
        self._lock_file = None  # rank 0's handle on out_dir/.lock while the run holds it
        if background:
            topology.background_group()  # created now, by every rank at once

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if is_complete(p)]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def lock(self) -> None:
        """Rank 0 holds an exclusive lock (flock) on out_dir/.lock while the run lives, released
        by the kernel if it dies: a second run in the same directory (a second terminal, a job
        requeued while the first still runs) would log every step twice and delete the other's
        checkpoint in progress. Where the filesystem has no locks, a warning and no guard."""
        holder = None
        if self.topology.is_main:
            path = self.dir.parent / ".lock"
            path.parent.mkdir(parents=True, exist_ok=True)
            file = path.open("a+")
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = file.read().strip() or "a process"
                file.close()
            except OSError as e:
                log.warning("cannot lock %s (%s): concurrent runs in it are not prevented", path, e)
                file.close()
            else:
                file.seek(0)
                file.truncate()
                file.write(f"{socket.gethostname()} pid {os.getpid()}\n")
                file.flush()
                self._lock_file = file
        if self.topology.any(holder is not None):
            raise ConfigError(
                f"another run is using trainer.out_dir={self.dir.parent} ({holder or 'see rank 0'}); "
                "wait for it to end, stop it, or choose another trainer.out_dir"
            )

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    def set_aside_later_than(self, step: int) -> None:
        """Rank 0: a run resumed from an earlier checkpoint of its own continues from there; the
        later checkpoints belong to the timeline it left. They move to checkpoints/superseded/
        (nothing is deleted), so that keep_last and trainer.resume=auto see this timeline only."""
        if self.topology.is_main:
            later = [p for p in self.complete() if int(_STEP_DIR.match(p.name).group(1)) > step]
            if later:
                aside = self.dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
                aside.mkdir(parents=True, exist_ok=True)
                for p in later:
                    p.rename(aside / p.name)
                log.warning(
                    "resumed from step %d of this run: its %d later checkpoint(s) (%s) moved to %s",
                    step, len(later), ", ".join(p.name for p in later), aside,
                )  # fmt: skip
        self.topology.barrier()

    def remove_partial(self) -> None:
        """Delete folders left by a save that crashed (rank 0)."""
        if self.topology.is_main and self.dir.is_dir():
            for p in self.dir.glob("*.tmp"):
                shutil.rmtree(p, ignore_errors=True)
        self.topology.barrier()

    def save(self, config: Config, engine, progress: Progress) -> Path:
        """All ranks: the engine writes its state into step_X.tmp, and once every rank's files are
        written rank 0 adds config.yaml and renames it step_X. In the background (trainer.
        async_checkpoint) this returns after the state is copied, and finish() completes it: the
        next save, or the end of the run."""
        self.finish()
        topo = self.topology
        final = self.dir / f"step_{progress.step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if topo.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        topo.barrier("barrier (checkpoint start)")
        written = engine.save(tmp, _progress_state(progress), self.background)
        self._in_flight = (written, final, OmegaConf.to_yaml(OmegaConf.structured(config)))
        if not self.background:
            self.finish()
        return final

    def finish(self, all_ranks: bool = True) -> Path | None:
        """Complete the save in flight, if any, and return its folder: wait until this rank's files
        are written (on rank 0: every rank's, DCP's metadata last), then rank 0 writes config.yaml,
        renames and prunes. all_ranks=False (a run stopped by an error, where another rank may be
        gone): no barrier, and a failed write is logged, its .tmp folder left for the next run to
        delete."""
        if self._in_flight is None:
            return None
        written, final, config_yaml = self._in_flight
        self._in_flight = None
        tmp = final.with_name(final.name + ".tmp")
        topo = self.topology
        try:
            if written is not None:
                written.result()
            if topo.is_main:
                (tmp / "config.yaml").write_text(config_yaml)
                old = final.with_name(final.name + ".old")
                if final.exists():
                    final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
                for stale in self.complete()[: -self.keep_last]:
                    if stale != final:
                        shutil.rmtree(stale, ignore_errors=True)
        except Exception as e:
            if all_ranks:
                raise
            log.warning("the checkpoint %s was not completed: %s", final.name, e)
            return None
        if all_ranks:
            topo.barrier("barrier (checkpoint renamed)")
        log.info("saved %s", final)
        return final

    def load(self, path: Path, engine, model: ModelConfig) -> Progress:
        """Restore the engine's state (model, optimizer), data position and RNG in place. A
        checkpoint of another engine or architecture (`model`: this run's) is a CheckpointMismatch."""
        if not is_complete(path):
            raise ConfigError(
                f"trainer.resume={path} is not a complete checkpoint "
                "(a step_XXXXXXXX folder with config.yaml)"
            )
        saved = load_config(path)
        written_by = saved.engine.name
        if written_by != engine.name:
            raise CheckpointMismatch(
                f"checkpoint {path} was written by engine={written_by} and this run uses "
                f"engine={engine.name}; resume with engine={written_by}, "
                f"or start from its weights with trainer.init_from={path}"
            )
        _refuse_other_architecture(path, saved.model, model)
        try:
            state = engine.load(path, _progress_state(Progress()))
        except ConfigError:
            raise
        except (RuntimeError, KeyError, ValueError) as e:  # e.g. optimizer state of other parameters
            raise ConfigError(f"cannot resume from {path} in this run: {_reason(e)}") from e
        torch.set_rng_state(state["rng"])
        return Progress(int(state["step"]), int(state["consumed_samples"]))


def _progress_state(progress: Progress) -> dict:
    return {
        "step": torch.tensor(progress.step),
        "consumed_samples": torch.tensor(progress.consumed_samples),
        "rng": torch.get_rng_state(),
    }
