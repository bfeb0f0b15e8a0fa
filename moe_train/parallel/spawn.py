"""Run a function on N local processes with torchrun's environment: multi-process tests and benchmarks
on the CPU (gloo), without a launcher."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from pathlib import Path

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, result_dir, fn, args, threads):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(threads)
    try:
        fn(rank, *args)
    except BaseException as e:  # reported to the parent through a file
        Path(result_dir, f"rank{rank}.err").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise SystemExit(1) from None
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    # A finished rank leaves without the interpreter's teardown, which can abort after DeepSpeed ran
    # on gloo ("terminate called without an active exception") and fail a rank whose work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class RankFailed(RuntimeError):
    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        super().__init__("\n".join(f"rank {r}: {e}" for r, e in sorted(errors.items())))


def run_ranks(
    world_size: int, fn, *args, result_dir: str | Path, timeout: float = 300, threads: int | None = None
) -> None:
    """Run fn(rank, *args) on world_size processes, each with torchrun's RANK, WORLD_SIZE, LOCAL_RANK
    and MASTER_ADDR/PORT and `threads` intra-op threads (default: the cores shared out, at least 1).
    Raise RankFailed if any rank failed (its exception is in result_dir/rank<r>.err) or hung."""
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(
            target=_entry, args=(rank, world_size, port, str(result_dir), fn, args, threads), daemon=False
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = {
        r: Path(result_dir, f"rank{r}.err").read_text()
        for r in range(world_size)
        if Path(result_dir, f"rank{r}.err").exists()
    }
    errors.update({r: f"still running after {timeout}s" for r in hung})
    errors.update(
        {r: f"exit code {p.exitcode}" for r, p in enumerate(procs) if p.exitcode and r not in errors}
    )
    if errors:
        raise RankFailed(errors)
