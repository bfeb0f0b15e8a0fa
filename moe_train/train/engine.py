"""engine=native: our gradient averaging (GradientSync), AdamW, and DCP checkpoint state.

An engine owns what differs between native and DeepSpeed training (moe_train/train/deepspeed_engine.py):
backward of a micro-batch, the optimizer step with reduction and clipping, the optimizer's memory,
and the state a checkpoint folder holds. The Trainer drives either the same way.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from moe_train.config import Config
from moe_train.parallel.data_parallel import GradientSync
from moe_train.parallel.topology import Topology
from moe_train.train.checkpoint import dcp_load, dcp_save
from moe_train.train.optim import build_optimizer


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor) and t.ndim > 0)


class NativeEngine:
    name = "native"

    def __init__(self, model: nn.Module, config: Config, topology: Topology, micro_batches: int):
        self.model = model
        self.topology = topology
        self.micro_batches = micro_batches
        self.grad_clip = config.optim.grad_clip
        self.grad_sync = GradientSync(model, topology)
        self.optimizer = build_optimizer(model, config.optim, topology.device)

    def backward(self, loss: torch.Tensor) -> None:
        """`loss` is one micro-batch's mean; gradients accumulate over the batch's micro-batches."""
        (loss / self.micro_batches).backward()

    def step(self, lr: float) -> float:
        """Reduce, clip, step; returns the gradient norm before clipping. A norm that is not finite
        (the trainer then stops the run) leaves the weights and Adam's moments as they were."""
        self.grad_sync.reduce()
        norm = self.grad_sync.clip(self.grad_clip).item()
        if math.isfinite(norm):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def optimizer_state_bytes(self) -> dict[str, int]:
        """This rank's optimizer memory, from its tensors: Adam's moments (the parameters themselves
        are the fp32 master weights here)."""
        moments = tensor_bytes(t for state in self.optimizer.state.values() for t in state.values())
        return {"moments": moments, "master_weights": 0}

    def _state(self, progress: dict) -> dict:
        return {
            "model": self.model.state_dict(),
            "optim": get_optimizer_state_dict(self.model, self.optimizer),
            "progress": progress,
        }

    def save(self, folder: Path, progress: dict, background: bool = False) -> Future | None:
        return dcp_save(self._state(progress), folder, self.topology, background)

    def load(self, folder: Path, progress: dict) -> dict:
        """Restore model and optimizer in place at any expert layout; returns the saved `progress`."""
        state = dcp_load(self._state(progress), folder, self.topology)
        self.model.load_state_dict(state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        return state["progress"]
