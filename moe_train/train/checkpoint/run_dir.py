"""A run's checkpoints/ folder: step folders saved atomically and pruned to keep_last, the run's
lock on its out_dir, and the checks before a resume."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import socket
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moe_train.config import Config, ConfigError, ModelConfig
from moe_train.parallel.topology import Topology
from moe_train.train.checkpoint.compat import load_config, refuse_other_kind
from moe_train.train.checkpoint.dcp_io import reason

log = logging.getLogger(__name__)

_STEP_FOLDER = re.compile(r"^step_(\d+)$")


def step_folder(step: int) -> str:
    """The name of the checkpoint folder of `step`: step_00000100."""
    return f"step_{step:08d}"


def step_of(path: Path) -> int | None:
    """The step a checkpoint folder is named after (step_00000100: 100); None for another name."""
    match = _STEP_FOLDER.match(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    """A renamed step folder; config.yaml is written last, after every rank's files."""
    return step_of(path) is not None and (path / "config.yaml").is_file()


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in a checkpoints/ folder, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_complete(p)), key=step_of)


@dataclass
class Progress:
    """Counters that a resumed run continues from."""

    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # global training sequences read (the data position)


class Checkpointer:
    """out_dir/checkpoints/step_00000100/ holds DCP's shards and .metadata (the model under "model",
    the engine's optimizer state under "optim", the data position and RNG under "progress") and
    config.yaml. Every rank writes its own files into step_XXXXXXXX.tmp; rank 0 writes config.yaml
    and renames the folder once every rank has finished, so a folder without .tmp is complete, and
    a crash mid-save leaves only a .tmp folder that resume ignores and the next run deletes."""

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
        return complete_checkpoints(self.dir)

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
            later = [p for p in self.complete() if step_of(p) > step]
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
        final = self.dir / step_folder(progress.step)
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
        refuse_other_kind(path, load_config(path), engine.name, model)
        try:
            state = engine.load(path, _progress_state(Progress()))
        except ConfigError:
            raise
        except (RuntimeError, KeyError, ValueError) as e:  # e.g. optimizer state of other parameters
            raise ConfigError(f"cannot resume from {path} in this run: {reason(e)}") from e
        torch.set_rng_state(state["rng"])
        return Progress(int(state["step"]), int(state["consumed_samples"]))


def _progress_state(progress: Progress) -> dict:
    return {
        "step": torch.tensor(progress.step),
        "consumed_samples": torch.tensor(progress.consumed_samples),
        "rng": torch.get_rng_state(),
    }
