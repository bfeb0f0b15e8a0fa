"""What happens around each training step: evaluation, metrics, progress, checkpoints, early exit
(step or time budget, preemption signals) and the samples printed at the end.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import AbstractContextManager
from typing import Protocol

import torch
from tqdm import tqdm

from moe_train.config import Config
from moe_train.data.tokenizer import ByteTokenizer, HFTokenizer
from moe_train.model import Transformer
from moe_train.model.documents import DocumentPacking
from moe_train.model.generate import generate
from moe_train.model.moe import dropless
from moe_train.parallel.pipeline import Pipeline
from moe_train.parallel.topology import Topology
from moe_train.train.checkpoint import Checkpointer, Progress
from moe_train.train.engine import Engine
from moe_train.train.metrics import MetricsWriter

log = logging.getLogger(__name__)


class Trainer(Protocol):
    """What callbacks see of the trainer (moe_train/train/trainer.py)."""

    config: Config
    topology: Topology
    device: torch.device
    model: Transformer  # with pipeline stages: this rank's part of it
    pipeline: Pipeline | None
    tokenizer: ByteTokenizer | HFTokenizer
    documents: DocumentPacking
    engine: Engine
    checkpointer: Checkpointer
    progress: Progress

    @property
    def finished(self) -> bool: ...

    def evaluate(self) -> dict[str, float]: ...

    def autocast(self) -> AbstractContextManager: ...


SAMPLE_PROMPTS = ("def ", "class ", "import ")


class Callback:
    """A callback returns True from on_step_end to ask the loop to stop; the ranks agree first."""

    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, metrics: dict) -> bool | None:
        pass

    def on_fit_end(self, trainer: Trainer) -> None:
        pass

    def close(self) -> None:
        pass


def _due(step: int, every: int, trainer: Trainer) -> bool:
    return trainer.finished or (every > 0 and step % every == 0)


class Evaluate(Callback):
    def on_step_end(self, trainer, metrics):
        if trainer.config.trainer.eval_every and _due(
            metrics["step"], trainer.config.trainer.eval_every, trainer
        ):
            metrics.update(trainer.evaluate())


class LogMetrics(Callback):
    def on_fit_start(self, trainer):
        self.writer = MetricsWriter(trainer.config, trainer.progress.step)

    def on_step_end(self, trainer, metrics):
        if "val_loss" in metrics or _due(metrics["step"], trainer.config.trainer.log_every, trainer):
            self.writer.log(metrics)
        if "val_loss" in metrics:
            log.info(
                "step %d: val_loss %.4f nats/token, %.4f nats/byte",
                metrics["step"],
                metrics["val_loss"],
                metrics["val_loss_per_byte"],
            )

    def close(self):
        self.writer.close()


class ProgressBar(Callback):
    def on_fit_start(self, trainer):
        t = trainer.config.trainer
        self.bar = tqdm(total=t.max_steps, initial=trainer.progress.step, desc="train", dynamic_ncols=True)

    def on_step_end(self, trainer, metrics):
        postfix = {"loss": f"{metrics['loss']:.3f}", "tok/s": f"{metrics['tokens_per_sec']:.0f}"}
        if "val_loss" in metrics:
            postfix["val"] = f"{metrics['val_loss']:.3f}"
        if "mfu" in metrics:
            postfix["mfu"] = f"{metrics['mfu']:.1%}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def on_fit_end(self, trainer):
        self.bar.close()  # before the samples: its elapsed time is the training's

    def close(self):
        self.bar.close()


class SaveCheckpoints(Callback):
    """Every trainer.ckpt_every steps and at the end. A save in the background (trainer.
    async_checkpoint) is completed by the next one, by the end of the run, or, if an error stops
    the run, as far as it can be without the other ranks."""

    def on_fit_start(self, trainer):
        self.saved_step = trainer.progress.step
        self.checkpointer = trainer.checkpointer

    def _save(self, trainer):
        path = self.checkpointer.save(trainer.config, trainer.engine, trainer.progress)
        self.saved_step = trainer.progress.step
        if self.checkpointer.background:
            log.info("writing %s in the background", path)

    def on_step_end(self, trainer, metrics):
        if _due(metrics["step"], trainer.config.trainer.ckpt_every, trainer):
            self._save(trainer)

    def on_fit_end(self, trainer):
        if self.saved_step != trainer.progress.step:  # an early exit
            self._save(trainer)
        self.checkpointer.finish()

    def close(self):
        self.checkpointer.finish(all_ranks=False)  # a no-op after on_fit_end


class EarlyExit(Callback):
    """Stops after trainer.exit_after_steps / exit_after_minutes in this invocation, or when Slurm
    (or anyone) sends SIGTERM, SIGUSR1 or SIGUSR2 (what Hydra's submitit launcher has Slurm send
    before the time limit), or at a first Ctrl-C (SIGINT): the step in flight
    finishes, a checkpoint is written, and the process exits cleanly so a requeued job resumes
    with trainer.resume=auto. A second Ctrl-C stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)  # USR2: submitit's

    def on_fit_start(self, trainer):
        self.start_step = trainer.progress.step
        self.start_time = time.monotonic()
        self.signal_received: str | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signal_received = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self.previous[signal.SIGINT])  # the next Ctrl-C interrupts
            log.warning("Ctrl-C: stopping with a checkpoint after this step (Ctrl-C again to stop at once)")

    def on_step_end(self, trainer, metrics):
        t = trainer.config.trainer
        if self.signal_received:
            log.warning(
                "%s received: checkpointing at step %d and exiting", self.signal_received, metrics["step"]
            )
            return True
        if t.exit_after_steps is not None and metrics["step"] - self.start_step >= t.exit_after_steps:
            log.info("trainer.exit_after_steps=%d reached", t.exit_after_steps)
            return True
        minutes = (time.monotonic() - self.start_time) / 60
        if t.exit_after_minutes is not None and minutes >= t.exit_after_minutes:
            log.info("trainer.exit_after_minutes=%g reached", t.exit_after_minutes)
            return True
        return False

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class PrintSamples(Callback):
    """At the end of a finished run, a few samples show what the model learned. Every rank
    generates (expert-parallel layers need every rank in each forward, pipeline stages each
    other); rank 0 prints."""

    def on_fit_end(self, trainer):
        t = trainer.config.trainer
        if not trainer.finished or t.num_samples == 0:
            return
        tokenizer = trainer.tokenizer
        generator = torch.Generator().manual_seed(t.seed)
        trainer.model.eval()
        model = trainer.model if trainer.pipeline is None else trainer.pipeline.generation_view()
        for i in range(t.num_samples):
            prompt_text = SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)]
            prompt = torch.tensor([tokenizer.encode(prompt_text)], device=trainer.device)
            with trainer.autocast(), dropless(trainer.model):  # as generate and an export route
                tokens = generate(
                    model, prompt, t.sample_tokens, generator=generator, documents=trainer.documents
                )
            if trainer.topology.is_main:
                print(f"\n----- sample {i + 1} -----\n{tokenizer.decode(tokens[0].tolist())}", flush=True)
        trainer.model.train()


def default_callbacks(trainer: Trainer) -> list[Callback]:
    """Order matters: evaluation adds val_loss before metrics are written; exit checks come last."""
    callbacks: list[Callback] = [Evaluate()]
    if trainer.topology.is_main:
        callbacks.append(LogMetrics())
        if trainer.config.logging.progress_bar:
            callbacks.append(ProgressBar())
    callbacks += [SaveCheckpoints(), EarlyExit(), PrintSamples()]
    return callbacks
