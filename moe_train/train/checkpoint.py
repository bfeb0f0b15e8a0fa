"""Sharded, atomic, reshardable checkpoints through torch.distributed.checkpoint (DCP).

Layout: out_dir/checkpoints/step_00000100/ holds DCP's shards, its .metadata and config.yaml.
Each rank writes only its own shards into step_XXXXXXXX.tmp; rank 0 renames the folder once every
rank has finished, so a folder without the .tmp suffix is always complete, and a crash mid-save
leaves only a .tmp folder that resume ignores and the next run deletes.
"""

from __future__ import annotations

import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from moe_train.config import Config, ConfigError
from moe_train.parallel.expert_parallel import expert_shards_to_dtensors
from moe_train.parallel.topology import Topology

warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class Progress:
    """Counters that a resumed run continues from."""

    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # global training sequences read (the data position)


def is_complete(path: Path) -> bool:
    return _STEP_DIR.match(path.name) is not None and (path / ".metadata").is_file()


def load_config(checkpoint: str | Path) -> Config:
    """The configuration a checkpoint was written with."""
    checkpoint = Path(checkpoint)
    if not ((checkpoint / "config.yaml").is_file() and (checkpoint / ".metadata").is_file()):
        raise ConfigError(
            f"{checkpoint} is not a moe_train checkpoint (a folder with .metadata and config.yaml)"
        )
    schema = OmegaConf.structured(Config)
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(checkpoint / "config.yaml")))


def _dcp_load(state: dict, path: Path, topology: Topology | None) -> dict:
    """Load `state` in place from a DCP checkpoint, presenting expert shards as DTensors; a load
    that does not fit this model becomes one line naming the first mismatch."""
    distributed = topology is not None and topology.distributed
    if topology is not None:
        state = expert_shards_to_dtensors(state, topology)
    try:
        dcp.load(state, checkpoint_id=path, no_dist=not distributed)
    except (Exception, CheckpointException) as e:  # another model's checkpoint, or a damaged one
        raise ConfigError(f"cannot load checkpoint {path} into this model: {_reason(e)}") from e
    return expert_shards_to_dtensors(state, topology, inverse=True) if topology is not None else state


def load_weights(path: str | Path, model: nn.Module, topology: Topology | None = None) -> None:
    """Model weights only, from a training checkpoint or a weights-only one, at any expert layout."""
    path = Path(path)
    load_config(path)  # checks it is a checkpoint
    state = _dcp_load({"model": model.state_dict()}, path, topology)
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
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Checkpointer:
    def __init__(self, out_dir: str | Path, topology: Topology, keep_last: int):
        self.dir = Path(out_dir) / "checkpoints"
        self.topology = topology
        self.keep_last = keep_last

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if is_complete(p)]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    def remove_partial(self) -> None:
        """Delete folders left by a save that crashed (rank 0)."""
        if self.topology.is_main and self.dir.is_dir():
            for p in self.dir.glob("*.tmp"):
                shutil.rmtree(p, ignore_errors=True)
        self.topology.barrier()

    def _state(self, model: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress) -> dict:
        return {
            "model": model.state_dict(),
            "optim": get_optimizer_state_dict(model, optimizer),
            "progress": {
                "step": torch.tensor(progress.step),
                "consumed_samples": torch.tensor(progress.consumed_samples),
                "rng": torch.get_rng_state(),
            },
        }

    def save(
        self,
        config: Config,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        progress: Progress,
    ) -> Path:
        topo = self.topology
        final = self.dir / f"step_{progress.step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if topo.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        topo.barrier("barrier (checkpoint start)")
        state = expert_shards_to_dtensors(self._state(model, optimizer, progress), topo)
        dcp.save(state, checkpoint_id=tmp, no_dist=not topo.distributed)
        topo.barrier("barrier (checkpoint shards written)")
        if topo.is_main:
            (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
            old = final.with_name(final.name + ".old")
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
            for stale in self.complete()[: -self.keep_last]:
                shutil.rmtree(stale, ignore_errors=True)
        topo.barrier("barrier (checkpoint renamed)")
        return final

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Progress:
        """Restore model, optimizer, data position and RNG in place, at any expert-parallel layout."""
        if not is_complete(path):
            raise ConfigError(
                f"trainer.resume={path} is not a complete checkpoint (a step_XXXXXXXX folder with .metadata)"
            )
        state = _dcp_load(self._state(model, optimizer, Progress()), path, self.topology)
        model.load_state_dict(state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        torch.set_rng_state(state["progress"]["rng"])
        return Progress(int(state["progress"]["step"]), int(state["progress"]["consumed_samples"]))
