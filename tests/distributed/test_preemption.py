"""Slurm-style preemption: SIGUSR1/SIGTERM -> finish the step, checkpoint, exit cleanly, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_train.parallel.spawn import free_port, run_ranks
from tests.conftest import TINY
from tests.distributed import workers

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("layout", ["parallel.ep=2", "parallel.pp=2"])
def test_signal_on_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path, layout):
    """Expert parallelism, or two pipeline stages: the signalled last stage stops the first too."""
    out_dir = tmp_path / "run"
    overrides = [
        *TINY,
        f"trainer.out_dir={out_dir}",
        "trainer.max_steps=50",
        "trainer.ckpt_every=0",
        "trainer.eval_every=0",
        layout,
    ]
    run_ranks(2, workers.train_until_signalled, overrides, tmp_path, result_dir=tmp_path)
    assert {(tmp_path / f"rank{r}.step").read_text() for r in range(2)} == {"3"}
    assert [p.name for p in (out_dir / "checkpoints").iterdir()] == ["step_00000003"]


def signal_after_three_steps(proc, out_dir: Path, signum) -> tuple[str, int]:
    """Send signum once the run has logged 3 steps; asserts it then exits 0 with one checkpoint, at
    the step it stopped at (before trainer.max_steps=400). Returns its output and that step."""
    metrics = out_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    stopped = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert [p.name for p in (out_dir / "checkpoints").iterdir()] == [f"step_{stopped:08d}"]
    assert stopped < 400
    return output, stopped


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_sigterm_or_ctrl_c_to_a_cli_run_checkpoints_exits_zero_and_resumes(tmp_path, signum):
    out_dir = tmp_path / "run"
    args = [
        *TINY,
        f"trainer.out_dir={out_dir}",
        "trainer.max_steps=400",
        "trainer.ckpt_every=0",
        "trainer.eval_every=0",
        "trainer.num_samples=0",
    ]
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output, stopped = signal_after_three_steps(proc, out_dir, signum)
    assert f"{signal.Signals(signum).name} received" in output
    metrics = out_dir / "metrics.jsonl"

    resumed = subprocess.run(
        [sys.executable, "train.py", *args, "trainer.max_steps=" + str(stopped + 2)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, stopped + 3))


@pytest.mark.skipif(
    not (ROOT / ".venv" / "bin" / "torchrun").exists(), reason="launch/ runs .venv/bin/torchrun (make setup)"
)
def test_slurm_task_forwards_usr1_to_the_workers(tmp_path):
    """launch/slurm_task.sh as srun starts it on a node (here one node of 2 CPU processes, through
    launch/torchrun_multinode.sh): the USR1 that slurm.sbatch sends before the time limit reaches the
    workers past torchrun (which would die of it), and they stop at one step with a checkpoint and
    exit 0."""
    out_dir = tmp_path / "run"
    args = [*TINY, f"trainer.out_dir={out_dir}", "trainer.max_steps=400", "trainer.ckpt_every=0"]
    args += ["trainer.eval_every=0", "trainer.num_samples=0", "parallel.ep=2"]
    rendezvous = {
        "NNODES": "1",
        "NPROC_PER_NODE": "2",
        "RDZV_HOST": "127.0.0.1",
        "RDZV_PORT": str(free_port()),
    }
    proc = subprocess.Popen(
        ["launch/slurm_task.sh", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **rendezvous, "PYTHONUNBUFFERED": "1"},
    )
    output, _ = signal_after_three_steps(proc, out_dir, signal.SIGUSR1)
    assert "SIGUSR1 received" in output
