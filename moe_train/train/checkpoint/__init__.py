"""Checkpoints: DCP folders of a run's state, saved atomically into its checkpoints/ folder,
resumed only by a run of the same kind, and read as weights by the tools and trainer.init_from."""

from moe_train.train.checkpoint.compat import ARCHITECTURE, CheckpointMismatch, load_config
from moe_train.train.checkpoint.dcp_io import _host_copy as _host_copy  # for tests/unit/test_checkpoint.py
from moe_train.train.checkpoint.dcp_io import dcp_load, dcp_save
from moe_train.train.checkpoint.run_dir import (
    Checkpointer,
    CheckpointNotSaved,
    Progress,
    check_run_folders,
    is_complete,
    step_folder,
    step_of,
)
from moe_train.train.checkpoint.weights import load_model, load_weights, resolve_checkpoint, save_weights

__all__ = [
    "ARCHITECTURE",
    "CheckpointMismatch",
    "CheckpointNotSaved",
    "Checkpointer",
    "Progress",
    "check_run_folders",
    "dcp_load",
    "dcp_save",
    "is_complete",
    "load_config",
    "load_model",
    "load_weights",
    "resolve_checkpoint",
    "save_weights",
    "step_folder",
    "step_of",
]
