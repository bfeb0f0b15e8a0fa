"""A run's checkpoints/ folder: step folders saved atomically and pruned to keep_last, the run's
lock on its out_dir, the checks of the folders a run writes, before a resume and before a save."""

from __future__ import annotations

import errno
import fcntl
import logging
import math
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
from torch.distributed.checkpoint.api import CheckpointException

from moe_train.config import Config, ConfigError, ModelConfig
from moe_train.parallel.topology import Topology
from moe_train.train.checkpoint.compat import load_config, refuse_other_kind
from moe_train.train.checkpoint.dcp_io import reason, underlying

log = logging.getLogger(__name__)

_STEP_FOLDER = re.compile(r"^step_(\d+)$")
_NEARLY_FULL = 2**20  # free bytes below which a failed write is put down to a full filesystem


class CheckpointNotSaved(RuntimeError):
    """A checkpoint could not be written (its filesystem is full, say): the run stops with one line
    (train.py, exit code 1), its earlier checkpoints intact and no .tmp folder left behind."""


def check_folder(key: str, path: str | Path) -> None:
    """`path`, the value of setting `key`, is a folder this process can write (created if missing):
    a file in its place or above it is one line (ConfigError) before any work."""
    path = Path(path).expanduser()
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker == path:
        raise ConfigError(f"{key}={path} is a file, not a folder")
    if blocker is not None:
        raise ConfigError(f"{key}={path} cannot be created: {blocker} is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}={path} cannot be created: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path} is not writable (permission denied)")


def check_run_folders(config: Config) -> None:
    """The folders a run writes: trainer.out_dir, and data.cache_dir where its data uses one."""
    check_folder("trainer.out_dir", config.trainer.out_dir)
    if config.data.name != "stdlib_bytes":
        check_folder("data.cache_dir", config.data.cache_dir)


def _lock(out_dir: Path):
    """(the open lock file, None) once this process holds out_dir/.lock, or (None, the holder
    written in it) if another does; (None, None) where the filesystem has no locks."""
    path = out_dir / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    file = path.open("a+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "a process"
        file.close()
        return None, holder
    except OSError as e:
        log.warning("cannot lock %s (%s): concurrent runs in it are not prevented", path, e)
        file.close()
        return None, None
    file.seek(0)
    file.truncate()
    file.write(f"{socket.gethostname()} pid {os.getpid()}\n")
    file.flush()
    return file, None


def run_in_use(out_dir: Path, holder: str) -> ConfigError:
    return ConfigError(
        f"another run is using trainer.out_dir={out_dir} ({holder}); "
        "wait for it to end, stop it, or choose another trainer.out_dir"
    )


def refuse_a_run_in_use(out_dir: Path) -> None:
    """Before anything is written there (Hydra's .hydra/ record included): a run that holds
    out_dir/.lock is refused in one line. The lock is let go at once; the run takes it again."""
    if not out_dir.is_dir():
        return
    file, holder = _lock(out_dir)
    if file is not None:
        file.close()
    if holder is not None:
        raise run_in_use(out_dir, holder)


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


def _delete(folder: Path) -> None:
    """Rename a checkpoint aside, then delete it: a kill midway leaves step_X.deleting, which
    remove_partial finishes, never a step_X that looks complete and has lost its shards."""
    doomed = folder.with_name(folder.name + ".deleting")
    folder.rename(doomed)
    shutil.rmtree(doomed)


def _bytes_on_disk(folder: Path) -> int:
    """The space a folder's files take (their size, or the blocks they hold where that is more)."""
    total = 0
    for path in folder.rglob("*"):
        if path.is_file():
            stat = path.stat()
            total += max(stat.st_size, stat.st_blocks * 512)
    return total


def _free_bytes(folder: Path) -> int:
    """What this process may still write on the filesystem of `folder`."""
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def _size(num_bytes: int) -> str:
    """4418945 -> '4.2 MiB'."""
    if num_bytes < 1024:
        return f"{num_bytes} bytes"
    power = min(int(math.log(num_bytes, 1024)), 4)
    return f"{num_bytes / 1024**power:.1f} {('KiB', 'MiB', 'GiB', 'TiB')[power - 1]}"


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
            self._lock_file, holder = _lock(self.dir.parent)
        if self.topology.any(holder is not None):
            raise run_in_use(self.dir.parent, holder or "see rank 0")

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
        """Rank 0: delete the folders that a save (step_X.tmp) or a pruning (step_X.deleting) cut
        short left, and name the step folders without config.yaml, which resume passes over and a
        save of their step replaces."""
        if self.topology.is_main and self.dir.is_dir():
            for p in [*self.dir.glob("*.tmp"), *self.dir.glob("*.deleting")]:
                shutil.rmtree(p, ignore_errors=True)
            for p in sorted(self.dir.iterdir()):
                if step_of(p) is not None and not is_complete(p):
                    log.warning(
                        "%s has no config.yaml (written last: a save or a copy cut short?): it is not "
                        "resumed from, and a save of step %d replaces it",
                        p, step_of(p),
                    )  # fmt: skip
        self.topology.barrier()

    def check_space(self, what: str | None = None) -> None:
        """All ranks: stop before writing a checkpoint (`what`; default: the next one) that would
        not fit: it takes about as much space as the newest one. Rank 0 looks, the ranks agree; a
        run without a checkpoint yet is not checked (a save that fills the disk is reported then)."""
        message = None
        previous = self.latest() if self.topology.is_main else None
        if previous is not None:
            free = _free_bytes(self.dir)
            if free < _bytes_on_disk(previous):
                message = self._no_space(what or f"the next checkpoint in {self.dir}", free, previous)
        if self.topology.any(message is not None):
            raise CheckpointNotSaved(message or "rank 0 found no space for the next checkpoint")

    def _no_space(self, what: str, free: int, previous: Path | None, written: int = 0) -> str:
        """The one line of a full disk: what needs how much (as much as `previous`; without one,
        more than was `written` when the disk filled up), how much is free, how to go on."""
        if previous is not None:
            need = f"about {_size(_bytes_on_disk(previous))} (the size of {previous.name})"
            resume = f"trainer.resume=auto continues from {previous.name}, which is intact"
        else:
            need = f"more than the {_size(written)} written when the disk filled up"
            resume = "nothing was saved yet"
        return (
            f"no space for {what}: it needs {need} but {_size(free)} is free there; free some space "
            f"and run again ({resume})"
        )

    def _not_saved(self, final: Path, error: BaseException | None) -> CheckpointNotSaved | None:
        """After a failed save, on every rank (their writes have ended: DCP gathers their outcome):
        rank 0 deletes the .tmp folder; returns what to raise instead of `error` (None: `error`
        itself). A full disk says how much the checkpoint needs and how much is free; another
        filesystem error names the folder. error=None: this rank succeeded, another one failed."""
        tmp = final.with_name(final.name + ".tmp")
        main = self.topology.is_main
        written = _bytes_on_disk(tmp) if main and tmp.is_dir() else 0
        full = _free_bytes(self.dir) < _NEARLY_FULL  # before the .tmp folder frees its space
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None:
            return CheckpointNotSaved(f"checkpoint {final} was not saved: rank 0 says why")
        cause = underlying(error)
        if full or getattr(cause, "errno", None) == errno.ENOSPC:
            free = _free_bytes(self.dir)
            return CheckpointNotSaved(self._no_space(f"checkpoint {final}", free, self.latest(), written))
        if isinstance(cause, OSError):  # a quota, a read-only filesystem, a permission
            return CheckpointNotSaved(f"cannot write checkpoint {final}: {reason(error)}")
        return None

    def save(self, config: Config, engine, progress: Progress) -> Path:
        """All ranks: the engine writes its state into step_X.tmp, and once every rank's files are
        written rank 0 adds config.yaml and renames it step_X. In the background (trainer.
        async_checkpoint) this returns after the state is copied, and finish() completes it: the
        next save, or the end of the run."""
        self.finish()
        topo = self.topology
        final = self.dir / step_folder(progress.step)
        self.check_space(f"checkpoint {final}")
        tmp = final.with_name(final.name + ".tmp")
        if topo.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        topo.barrier("barrier (checkpoint start)")
        try:
            written = engine.save(tmp, _progress_state(progress), self.background)
        except (Exception, CheckpointException) as e:
            not_saved = self._not_saved(final, e)
            if not_saved is None:
                raise
            raise not_saved from e
        self._in_flight = (written, final, OmegaConf.to_yaml(OmegaConf.structured(config)))
        if not self.background:
            self.finish()
        return final

    def finish(self, all_ranks: bool = True) -> Path | None:
        """Complete the save in flight, if any, and return its folder: wait until this rank's files
        are written (on rank 0: every rank's, DCP's metadata last), then rank 0 writes config.yaml,
        renames and prunes. A failed write deletes the .tmp folder and raises (CheckpointNotSaved
        where the filesystem is to blame) on every rank. all_ranks=False (a run stopped by an
        error, where another rank may be gone): nothing waits for the other ranks, and a failed
        write is logged."""
        if self._in_flight is None:
            return None
        written, final, config_yaml = self._in_flight
        self._in_flight = None
        tmp = final.with_name(final.name + ".tmp")
        topo = self.topology
        error = None
        try:
            if written is not None:
                written.result()
            if topo.is_main:
                self._complete(tmp, final, config_yaml)
        except (Exception, CheckpointException) as e:
            error = e
        if not all_ranks:
            if error is not None:
                if topo.is_main:  # its result came after every rank's writes had ended
                    shutil.rmtree(tmp, ignore_errors=True)
                log.warning("the checkpoint %s was not completed: %s", final.name, reason(error))
                return None
        elif topo.any(error is not None):  # every rank stops, also where only rank 0 failed
            not_saved = self._not_saved(final, error)
            if not_saved is None:
                raise error
            raise not_saved from error
        log.info("saved %s", final)
        return final

    def _complete(self, tmp: Path, final: Path, config_yaml: str) -> None:
        """Rank 0, once every rank's files are written: config.yaml last, rename, prune."""
        (tmp / "config.yaml").write_text(config_yaml)
        old = final.with_name(final.name + ".old")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        for stale in self.complete()[: -self.keep_last]:
            if stale != final:
                try:
                    _delete(stale)
                except OSError as e:  # the new checkpoint is complete: the run goes on
                    log.warning("cannot delete the old checkpoint %s: %s", stale, e)

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
