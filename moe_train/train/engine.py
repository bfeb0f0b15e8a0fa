"""The contract between the trainer and an engine (native, moe_train/train/native_engine.py, or
DeepSpeed's ZeRO, moe_train/train/deepspeed_engine.py): what differs between them and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

import torch

from moe_train.parallel.fsdp import local_tensor


class Engine(Protocol):
    name: str  # engine=<name>; recorded in each checkpoint's config.yaml

    def backward(self, loss: torch.Tensor) -> None:
        """`loss` is one micro-batch's mean; gradients accumulate over the step's micro-batches."""

    def step(self, lr: float) -> float:
        """Reduce, clip, run the step-pre hooks, step; the gradient norm before clipping. A norm
        that is not finite (the trainer then stops the run) may leave the weights as they were."""

    def register_step_pre_hook(self, hook: Callable[[], None]) -> None:
        """`hook` runs once per optimizer step, after the gradients are reduced, before the update."""

    def optimizer_state_bytes(self) -> dict[str, int]:
        """This rank's optimizer memory by kind ("moments", "master_weights"), from its tensors."""

    def save(self, folder: Path, progress: dict, background: bool = False) -> Future | None:
        """Write this rank's shards of model, optimizer and `progress` (DCP) into `folder`."""

    def load(self, folder: Path, progress: dict) -> dict:
        """Restore in place at any layout; returns the saved `progress`."""


def tensor_bytes(tensors) -> int:
    """The bytes this rank holds of `tensors` (a DTensor's local shard)."""
    local = (local_tensor(t) for t in tensors if isinstance(t, torch.Tensor))
    return sum(t.numel() * t.element_size() for t in local if t.ndim > 0)
