"""engine=native: the model as parallelize left it (FSDP2 on several processes: gradients reduced
during backward), torch's AdamW, global-norm clipping, and DCP checkpoint state."""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.nn.utils import clip_grads_with_norm_

from moe_train.config import Config
from moe_train.parallel.fsdp import clip_grad_norm_, dense_and_expert_params
from moe_train.parallel.pipeline import embedding_copy, sync_embedding_grads
from moe_train.parallel.topology import Topology
from moe_train.train.checkpoint import dcp_load, dcp_save
from moe_train.train.engine import Engine, tensor_bytes
from moe_train.train.optim import build_optimizer


class NativeEngine(Engine):
    name = "native"

    def __init__(self, model: nn.Module, config: Config, topology: Topology, micro_batches: int):
        self.model = model
        self.topology = topology
        self.micro_batches = micro_batches
        self.grad_clip = config.optim.grad_clip
        self.config = config
        self.optimizer = build_optimizer(model, config.optim, topology.device)
        self.embedding_copy = embedding_copy(model, topology)  # a pipeline's last stage's
        self.params = dense_and_expert_params(model, skip=self.embedding_copy)
        self._pre_step_hooks: list[Callable[[], None]] = []

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.micro_batches).backward()

    def register_step_pre_hook(self, hook: Callable[[], None]) -> None:
        self._pre_step_hooks.append(hook)

    def step(self, lr: float) -> float:
        """A norm that is not finite leaves the weights and Adam's moments as they were."""
        if self.topology.pp > 1:
            sync_embedding_grads(self.model, self.config, self.topology)
        norm_tensor = clip_grad_norm_(self.params, self.grad_clip, self.topology)
        if self.embedding_copy is not None and self.grad_clip > 0:  # counted on the first stage
            clip_grads_with_norm_([self.embedding_copy], self.grad_clip, norm_tensor)
        norm = norm_tensor.item()
        if math.isfinite(norm):
            for hook in self._pre_step_hooks:
                hook()
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def optimizer_state_bytes(self) -> dict[str, int]:
        """Adam's moments; the parameters themselves are the fp32 master weights here."""
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
        state = dcp_load(self._state(progress), folder, self.topology)
        self.model.load_state_dict(state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        return state["progress"]
