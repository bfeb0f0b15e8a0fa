"""The training loop: resume, step, and hand off to callbacks (evaluation, logging, checkpoints,
samples, early exits: moe_train/train/callbacks.py), so the loop itself stays a few lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path

import torch

from moe_train.config import Config, ConfigError, ModelConfig, TrainerConfig
from moe_train.data import build_datasets
from moe_train.model import Transformer, lm_loss, model_size
from moe_train.model.documents import document_packing
from moe_train.parallel.parallelize import materialize, parallelize
from moe_train.parallel.pipeline import Pipeline, check_micro_batches
from moe_train.parallel.topology import Topology
from moe_train.train.callbacks import Callback, default_callbacks
from moe_train.train.checkpoint import Checkpointer, CheckpointMismatch, Progress, load_weights
from moe_train.train.engine import Engine
from moe_train.train.expert_load import ExpertLoad
from moe_train.train.metrics import peak_flops
from moe_train.train.optim import lr_at

log = logging.getLogger(__name__)


class Diverged(RuntimeError):
    """A step's loss or gradient norm was not finite: the run stops before anything is saved."""


def batch_layout(t: TrainerConfig, ranks: int) -> TrainerConfig:
    """t with its micro-batch size resolved (null: each rank's whole share) and the layout checked:
    global_batch_size must split into micro-batches over the data-parallel ranks (all of them:
    expert-parallel ranks read different data too)."""
    if t.micro_batch_size is None:
        if t.global_batch_size % ranks:
            raise ConfigError(
                f"trainer.global_batch_size={t.global_batch_size} must be divisible by the {ranks} "
                "data-parallel ranks"
            )
        return dataclasses.replace(t, micro_batch_size=t.global_batch_size // ranks)
    if t.global_batch_size % (t.micro_batch_size * ranks):
        raise ConfigError(
            f"trainer.global_batch_size={t.global_batch_size} must be divisible by "
            f"trainer.micro_batch_size={t.micro_batch_size} x {ranks} data-parallel ranks"
        )
    return t


def vocab_layout(model: ModelConfig, vocab_size: int) -> ModelConfig:
    """model with its vocabulary resolved (null: the tokenizer's, recorded in checkpoints'
    config.yaml) and checked against the tokenizer's."""
    if model.vocab_size is None:
        return dataclasses.replace(model, vocab_size=vocab_size)
    if vocab_size > model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({vocab_size}); leave it unset to follow the tokenizer"
        )
    return model


def build_engine(
    model: Transformer, config: Config, topology: Topology, micro_batches: int, bf16: bool
) -> Engine:
    if config.engine.name == "deepspeed":  # imported only when asked for (DeepSpeed is slow to import)
        from moe_train.train.deepspeed_engine import ZeroEngine

        return ZeroEngine(model, config, topology, micro_batches, bf16=bf16)
    from moe_train.train.native_engine import NativeEngine

    return NativeEngine(model, config, topology, micro_batches)


class Trainer:
    """Builds the run from its config (the caller's config is left as it is: the resolved one is
    `trainer.config`) and trains it."""

    def __init__(self, config: Config, topology: Topology):
        config = dataclasses.replace(config, trainer=batch_layout(config.trainer, topology.dp_size))
        self.topology = topology
        t = config.trainer
        self.micro_batches_per_step = t.global_batch_size // (t.micro_batch_size * topology.dp_size)
        check_micro_batches(config.parallel, self.micro_batches_per_step)
        self.device = topology.device
        precision = (
            t.precision if t.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        )
        bf16 = precision == "bf16"
        self.autocast_dtype = torch.bfloat16 if bf16 else None

        datasets = build_datasets(config, topology)
        self.tokenizer, self.train_data, self.val_data = datasets.tokenizer, datasets.train, datasets.val
        self.documents = document_packing(config.data, self.tokenizer.eos_id)  # each batch's documents
        config = dataclasses.replace(config, model=vocab_layout(config.model, self.tokenizer.vocab_size))
        self.config = config
        self.val_bytes_per_token = self._bytes_per_token(self.val_data.samples(0, self._num_val_samples))

        torch.manual_seed(t.seed)
        with torch.device("meta"):  # each rank allocates and initialises only its own shards
            self.model = Transformer(config.model)
        self.size = model_size(self.model, config.data.seq_len)
        stages = parallelize(self.model, config, topology, bf16, self.documents)
        materialize(self.model, t.seed, topology)
        self.engine = build_engine(self.model, config, topology, self.micro_batches_per_step, bf16)
        self.pipeline = None
        if stages:  # FSDP computes in bf16 (its parameters' dtype), autocast alone keeps fp32
            hidden = torch.bfloat16 if bf16 and topology.data_parallel else torch.float32
            self.pipeline = Pipeline(stages, config, topology, self.micro_batches_per_step, hidden)
        self.expert_load = ExpertLoad(self.model, config.model.moe, topology)
        if config.model.moe.bias_update_rate:
            self.engine.register_step_pre_hook(self.expert_load.update_routing_bias)
        self.checkpointer = Checkpointer(t.out_dir, topology, t.keep_last, t.async_checkpoint)
        self.progress = Progress()
        self.peak_flops = peak_flops(self.device)
        self.callbacks = []

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def resume(self) -> None:
        t = self.config.trainer
        self.checkpointer.remove_partial()
        latest = self.checkpointer.latest()
        if t.resume == "none":
            if latest is not None:
                raise ConfigError(
                    f"trainer.out_dir={t.out_dir} already has checkpoints (newest: {latest.name}); "
                    "use trainer.resume=auto to continue that run or choose another trainer.out_dir"
                )
            return
        path = latest if t.resume == "auto" else Path(t.resume)
        if path is not None:
            try:
                self.progress = self.checkpointer.load(path, self.engine, self.config.model)
            except CheckpointMismatch:  # another run's kind: its older checkpoints do not fit either
                raise
            except ConfigError as e:  # damaged: an older checkpoint may be intact
                older = [p for p in self.checkpointer.complete() if p != path]
                if t.resume != "auto" or not older:
                    raise
                raise ConfigError(
                    f"{e}; an older checkpoint may be intact: trainer.resume={older[-1]}"
                ) from e.__cause__
            log.info("resumed from %s at step %d", path, self.progress.step)
            if path.resolve().parent == self.checkpointer.dir.resolve():
                self.checkpointer.set_aside_later_than(self.progress.step)
        elif t.init_from:
            load_weights(t.init_from, self.model, self.topology)
            log.info("starting from the weights of %s", t.init_from)
        if self.progress.step < t.max_steps:  # a disk still full says so now, not at the next save
            self.checkpointer.check_space()

    def fit(self, callbacks: list[Callback] | None = None) -> None:
        """Resume if asked, then train to trainer.max_steps (or an early exit). `callbacks`
        replaces the default list (moe_train.train.callbacks.default_callbacks)."""
        self.checkpointer.lock()  # before anything in trainer.out_dir is touched
        try:
            self._fit(callbacks)
        finally:
            self.checkpointer.unlock()

    def _fit(self, callbacks: list[Callback] | None) -> None:
        self.resume()
        t = self.config.trainer
        warn = log.warning if self.topology.is_main else log.debug  # said once, not once per rank
        if self.config.optim.warmup_steps >= t.max_steps:
            warn(
                "optim.warmup_steps=%d >= trainer.max_steps=%d: the learning rate never reaches optim.lr",
                self.config.optim.warmup_steps,
                t.max_steps,
            )
        mtp = self.config.model.mtp
        if mtp.num_layers and not mtp.loss_coef:
            warn(
                "model.mtp.loss_coef=0: the %d multi-token prediction depths run and learn nothing",
                mtp.num_layers,
            )
        if self.progress.step >= t.max_steps:
            warn(
                "%s is already at step %d of trainer.max_steps=%d: nothing to train",
                t.out_dir,
                self.progress.step,
                t.max_steps,
            )
            return
        self.callbacks, started = callbacks if callbacks is not None else default_callbacks(self), []
        try:
            for cb in self.callbacks:
                cb.on_fit_start(self)
                started.append(cb)
            while self.progress.step < t.max_steps:
                metrics = self.train_step()
                stop = False
                for cb in self.callbacks:
                    stop |= bool(cb.on_step_end(self, metrics))
                if self.topology.any(stop):  # every rank stops at the same step
                    break
            for cb in self.callbacks:
                cb.on_fit_end(self)
        finally:
            for cb in started:
                cb.close()

    @property
    def finished(self) -> bool:
        return self.progress.step >= self.config.trainer.max_steps

    def train_step(self) -> dict:
        """One optimizer step over this rank's share of the global batch; global metrics."""
        start_time = time.perf_counter()
        t, moe, topo = self.config.trainer, self.config.model.moe, self.topology
        per_rank = t.global_batch_size // topo.dp_size
        first = self.progress.consumed_samples + topo.dp_rank * per_rank  # every stage reads it
        batch = self.train_data.samples(first, per_rank)  # (per_rank, T + 1)
        data_time = time.perf_counter() - start_time

        self.model.train()
        self.expert_load.reset()
        if self.pipeline is None:
            losses = self._forward_backward(batch)
        else:
            batch = batch.to(self.device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            counted = self.documents(inputs, targets).loss_mask()
            losses, counts, dropped = self.pipeline.train_step(inputs, targets, counted, self.autocast)
            self.expert_load.add(counts, dropped)

        lr = lr_at(self.progress.step, self.config.optim, t.max_steps)
        grad_norm = self.engine.step(lr)
        # each rank's sums over its micro-batches (and with pipeline stages, over its layers)
        losses = topo.all_reduce(losses / self.micro_batches_per_step) / topo.dp_size
        lm, aux, device_aux, z, mtp = losses.tolist()
        self._stop_if_diverged(grad_norm, lm, aux, device_aux, z, mtp)
        self.progress.step += 1
        self.progress.consumed_samples += t.global_batch_size

        metrics = {
            "step": self.progress.step,
            "loss": self._objective(lm, aux, device_aux, z, mtp),
            "lm_loss": lm,
            "aux_loss": aux,
            "z_loss": z,
            "lr": lr,
            "grad_norm": grad_norm,
        }
        if moe.num_expert_groups > 1:
            metrics["device_aux_loss"] = device_aux
        if self.config.model.mtp.num_layers:
            metrics["mtp_loss"] = mtp
        if self.progress.step == 1:  # this rank's optimizer memory, once (it does not change)
            for kind, num_bytes in self.engine.optimizer_state_bytes().items():
                metrics[f"optimizer_{kind}_mb"] = num_bytes / 2**20
        metrics.update(self.expert_load.metrics())
        elapsed = time.perf_counter() - start_time
        tokens_per_sec = t.global_batch_size * self.config.data.seq_len / elapsed
        metrics["tokens_per_sec"] = tokens_per_sec
        metrics["step_time"] = elapsed
        metrics["data_time"] = data_time  # reading this rank's batch: the loader must not starve the step
        if self.peak_flops:
            metrics["mfu"] = self.size.flops_per_token * tokens_per_sec / (self.peak_flops * topo.world_size)
        return metrics

    def _forward_backward(self, batch: torch.Tensor) -> torch.Tensor:
        """Each micro-batch forward and backward on this rank; (lm, aux, device aux, z, mtp)
        summed over them."""
        losses = torch.zeros(5, device=self.device)
        for micro in batch.split(self.config.trainer.micro_batch_size):
            micro = micro.to(self.device, non_blocking=True)
            inputs, targets = micro[:, :-1], micro[:, 1:]
            documents = self.documents(inputs, targets)
            with self.autocast():
                out = self.model(inputs, targets=targets, documents=documents)
                lm = lm_loss(out.logits, targets, documents.loss_mask())
            other_losses = (out.aux_loss, out.device_aux_loss, out.z_loss, out.mtp_loss)
            self.engine.backward(self._objective(lm, *other_losses))
            losses += torch.stack([lm, *other_losses]).detach()
            self.expert_load.add(out.tokens_per_expert, out.dropped)
        return losses

    def _stop_if_diverged(self, grad_norm: float, *losses: float) -> None:
        """Every rank sees the same global norm and reduced losses, so all stop together, before
        the callbacks could save the damage (the native engine has not applied it either)."""
        if all(map(math.isfinite, (grad_norm, *losses))):
            return
        self.checkpointer.finish()  # one still being written, from before the damage
        latest = self.checkpointer.latest()
        optim = self.config.optim
        remedies = (
            f"a lower optim.lr (now {optim.lr:g}) or a longer optim.warmup_steps (now {optim.warmup_steps})"
        )
        if optim.grad_clip == 0:
            remedies += ", or clip gradients (optim.grad_clip > 0)"
        raise Diverged(
            f"step {self.progress.step + 1} diverged: loss {self._objective(*losses):.4g}, gradient norm "
            f"{grad_norm:.4g}. Stopped before saving it; "
            + (
                f"the newest checkpoint is {latest}: resume from it with {remedies}"
                if latest is not None
                else f"nothing was saved yet: start again with {remedies}"
            )
        )

    def _objective(self, lm, aux, device_aux, z, mtp):
        """What the step minimises: the LM loss plus the weighted router and multi-token prediction
        losses (tensors or floats)."""
        model = self.config.model
        moe = model.moe
        return (
            lm
            + moe.aux_loss_coef * aux
            + moe.device_aux_loss_coef * device_aux
            + moe.z_loss_coef * z
            + model.mtp.loss_coef * mtp
        )

    @property
    def _num_val_samples(self) -> int:
        t = self.config.trainer
        return t.eval_batches * t.global_batch_size

    def _bytes_per_token(self, sequences: torch.Tensor) -> float:
        """UTF-8 bytes per predicted token of the validation samples: turns nats/token into nats/byte."""
        targets = sequences[:, 1:]
        num_bytes = sum(len(self.tokenizer.decode(row.tolist()).encode("utf-8")) for row in targets)
        return max(num_bytes, 1) / targets.numel()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean next-token loss over the validation samples (eval_batches global batches, the same at
        every evaluation and layout, each rank taking its share as in training), per token and per byte."""
        t, topo = self.config.trainer, self.topology
        per_rank = t.global_batch_size // topo.dp_size
        sequences = self.val_data.samples(0, self._num_val_samples)
        mine = sequences.view(t.eval_batches, topo.dp_size, per_rank, -1)[:, topo.dp_rank]
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for batch in mine.to(self.device):  # every prediction counts, whatever data.eod_mask_loss says
            if self.pipeline is not None:  # the LM loss on the last stage, 0 on the others
                total += self.pipeline.eval_losses(batch[:, :-1], batch[:, 1:], self.autocast)
                continue
            for micro in batch.split(t.micro_batch_size):
                inputs = micro[:, :-1]
                with self.autocast():
                    total += lm_loss(
                        self.model(inputs, documents=self.documents(inputs)).logits, micro[:, 1:]
                    )
        self.model.train()
        num_micro_batches = t.eval_batches * self.micro_batches_per_step * topo.dp_size
        loss = (topo.all_reduce(total) / num_micro_batches).item()
        return {"val_loss": loss, "val_loss_per_byte": loss / self.val_bytes_per_token}


def run(config: Config) -> None:
    """Set up the process layout, train, and tear down, also on error."""
    topology = Topology.setup(config.parallel, config.trainer.device)
    try:
        Trainer(config, topology).fit()
    finally:
        topology.close()
