"""Model weights in and out of checkpoints, for the tools and trainer.init_from: both engines write
the same "model" entries, so weights load from any checkpoint, at any expert layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch import nn

from moe_train.config import Config, ConfigError
from moe_train.parallel.topology import Topology
from moe_train.train.checkpoint.compat import load_config
from moe_train.train.checkpoint.dcp_io import dcp_load, single_process_quiet
from moe_train.train.checkpoint.run_dir import complete_checkpoints


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
        found = complete_checkpoints(path / "checkpoints")
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
        with single_process_quiet():
            dcp.save({"model": model.state_dict()}, checkpoint_id=tmp, no_dist=True)
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
