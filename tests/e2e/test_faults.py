"""Bad paths and filesystem faults: one line naming the culprit and a non-zero exit, nothing that
existed lost, no .tmp left behind; writes a kill cannot leave half done."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_train.config import ParallelConfig
from moe_train.data.indexed import build_gpt_datasets, megatron_datasets
from moe_train.parallel.topology import Topology
from moe_train.tools.hydra_config import compose_config
from moe_train.train.checkpoint import Checkpointer, CheckpointNotSaved, Progress
from moe_train.train.metrics import MetricsWriter, read_metrics
from tests.conftest import TINY, losses, train

ROOT = Path(__file__).resolve().parents[2]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_bad_paths_one_line_exit_2(tmp_path):
    """Each command at once (they spend their time importing): a file where a folder goes."""
    taken = tmp_path / "taken"
    taken.write_text("keep")
    run_dir = tmp_path / "plotted"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0, "lm_loss": 5.0}) + "\n")
    train_py = [sys.executable, "train.py", *TINY]
    cases = [
        ([*train_py, f"trainer.out_dir={taken}"], f"trainer.out_dir={taken} is a file, not a folder"),
        (
            [*train_py, f"trainer.out_dir={taken}/run"],
            f"trainer.out_dir={taken}/run cannot be created: {taken} is a file",
        ),
        (
            [*train_py, "data=stdlib", f"data.cache_dir={taken}", f"trainer.out_dir={tmp_path / 'run'}"],
            f"data.cache_dir={taken} is a file, not a folder",
        ),
        (
            [sys.executable, "-m", "moe_train.tools.plot", str(run_dir), "--out", str(taken)],
            f"--out {taken} is a file, not a folder",
        ),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = [
        subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for args, _ in cases
    ]
    for process, (args, message) in zip(started, cases):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, (args, stderr)
        assert stderr.strip() == f"error: {message}", args
    assert taken.read_text() == "keep"
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]


def test_cli_preflight_one_line_from_rank_0_before_anything_starts(tmp_path):
    """Under a launcher, a layout or batch that does not fit the world is said once, by rank 0;
    a run already using trainer.out_dir is refused before Hydra writes its record there; a
    checkpoint of the other engine is named before DeepSpeed is set up."""
    import fcntl

    from omegaconf import OmegaConf

    busy, native = tmp_path / "busy", tmp_path / "native"
    busy.mkdir()
    lock = (busy / ".lock").open("a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write("otherhost pid 17\n")
    lock.flush()
    step = native / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"")
    (step / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(compose_config(TINY))))
    train_py = [sys.executable, "train.py", *TINY, f"trainer.out_dir={tmp_path / 'run'}"]
    world = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    cases = [
        (
            [*train_py, "parallel.ep=3"],
            {**world, "RANK": "0"},
            "model.moe.num_experts=8 must be divisible by parallel.ep=3",
        ),
        ([*train_py, "parallel.ep=3"], {**world, "RANK": "1"}, None),  # rank 0 says it
        (
            [*train_py, "parallel.pp=4", "model.num_layers=4"],
            {**world, "RANK": "0"},
            "parallel.pp=4 must divide the world size 2 (world = pp x the ranks of a stage); allowed pp "
            "values: 1, 2",
        ),
        (
            [*train_py, "parallel.pp=2", "trainer.micro_batch_size=8"],
            {**world, "RANK": "0"},
            "parallel.pp_schedule=1F1B at parallel.pp=2 needs at least 2 micro-batches per step, and this "
            "layout gives 1",
        ),
        (
            [*train_py, "trainer.global_batch_size=6"],
            {**world, "RANK": "0"},
            "trainer.global_batch_size=6 must be divisible by trainer.micro_batch_size=2 x 2 data-parallel ranks",
        ),
        (
            [*train_py, f"trainer.out_dir={busy}"],
            {},
            f"another run is using trainer.out_dir={busy} (otherhost pid 17); wait for it to end",
        ),
        (
            [*train_py, f"trainer.out_dir={native}", "engine=deepspeed"],
            {},
            f"checkpoint {step} was written by engine=native and this run uses engine=deepspeed",
        ),
    ]
    started = [
        subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, env, _ in cases
    ]
    for process, (args, _, message) in zip(started, cases):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, (args, stderr)
        if message is None:
            assert stderr == "", args
        else:
            assert stderr.count("\n") == 1 and stderr.startswith(f"error: {message}"), (args, stderr)
    assert sorted(p.name for p in busy.iterdir()) == [".lock"]  # no .hydra/ written over the running run
    lock.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 10 MiB tmpfs: room for two of the tiny model's checkpoints (4.3 MiB each), not three."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small filesystem with")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"mounting a small tmpfs is not permitted here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_stops_the_run_in_one_line_and_loses_nothing(small_disk, tmp_path):
    common = [*TINY, "trainer.max_steps=4", "trainer.ckpt_every=1", "trainer.eval_every=0"]
    whole = train([*common, f"trainer.out_dir={tmp_path / 'whole'}"])
    run_dir = small_disk / "run"
    ckpts = run_dir / "checkpoints"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "train.py", *common, f"trainer.out_dir={run_dir}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert re.fullmatch(
        rf"error: no space for checkpoint {ckpts}/step_00000003: it needs about [\d.]+ MiB \(the size "
        r"of step_00000002\) but [\d.]+ MiB is free there; free some space and run again "
        r"\(trainer.resume=auto continues from step_00000002, which is intact\)",
        result.stderr.strip(),
    ), result.stderr
    saved = files(ckpts)
    assert sorted({name.split("/")[0] for name in saved}) == ["step_00000001", "step_00000002"]  # no .tmp

    with pytest.raises(
        CheckpointNotSaved, match=f"^no space for the next checkpoint in {ckpts}: it needs about"
    ):
        train([*common, f"trainer.out_dir={run_dir}"])  # a resume while the disk is still full
    assert files(ckpts) == saved

    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)  # space is back
    assert losses(train([*common, f"trainer.out_dir={run_dir}"])) == losses(whole)

    # a first checkpoint (nothing to size it by) that fills the disk, written in the background
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    with (small_disk / "filler").open("wb") as f:
        f.write(b"\0" * (free - 2 * 2**20))  # 2 MiB left
    fresh = small_disk / "fresh"
    with pytest.raises(
        CheckpointNotSaved,
        match=rf"^no space for checkpoint {fresh}/checkpoints/step_00000001: it needs more than the "
        r"[\d.]+ MiB written when the disk filled up but [\d.]+ MiB is free there; .* \(nothing was saved yet\)",
    ):
        train([*common, "trainer.max_steps=1", "trainer.async_checkpoint=true", f"trainer.out_dir={fresh}"])
    assert list((fresh / "checkpoints").iterdir()) == []


class Killed(BaseException):
    """What a kill looks like to the code it interrupts: nothing after it runs."""


class FakeEngine:
    """Writes a checkpoint's files as DCP would, without a model."""

    def save(self, folder, progress, background=False):
        (folder / "__0_0.distcp").write_bytes(b"shard" * 100)
        (folder / ".metadata").write_bytes(b"metadata")


@pytest.fixture
def checkpointer(tmp_path):
    topology = Topology.setup(ParallelConfig(), "cpu")
    yield Checkpointer(tmp_path, topology, keep_last=1)
    topology.close()


def test_pruning_killed_midway_leaves_no_checkpoint_that_looks_complete(tmp_path, checkpointer, monkeypatch):
    config = compose_config([*TINY, f"trainer.out_dir={tmp_path}"])
    checkpointer.save(config, FakeEngine(), Progress(step=1))
    rmtree = shutil.rmtree

    def killed_after_one_file(path, *args, **kwargs):
        shards = list(Path(path).glob("*.distcp"))
        if not shards:
            return rmtree(path, *args, **kwargs)
        shards[0].unlink()
        raise Killed

    monkeypatch.setattr(shutil, "rmtree", killed_after_one_file)
    with pytest.raises(Killed):
        checkpointer.save(config, FakeEngine(), Progress(step=2))  # prunes step 1
    monkeypatch.undo()
    assert [p.name for p in checkpointer.complete()] == ["step_00000002"]
    checkpointer.remove_partial()
    assert [p.name for p in checkpointer.dir.iterdir()] == ["step_00000002"]


def test_a_step_folder_without_config_yaml_is_named_and_passed_over(tmp_path, checkpointer, caplog):
    config = compose_config([*TINY, f"trainer.out_dir={tmp_path}"])
    checkpointer.keep_last = 2
    for step in (1, 2):
        checkpointer.save(config, FakeEngine(), Progress(step=step))
    (checkpointer.dir / "step_00000002" / "config.yaml").unlink()
    checkpointer.remove_partial()
    assert f"{checkpointer.dir / 'step_00000002'} has no config.yaml" in caplog.text
    assert checkpointer.latest().name == "step_00000001"


def test_a_metrics_rewrite_killed_midway_loses_nothing(tmp_path, monkeypatch):
    config = compose_config([*TINY, f"trainer.out_dir={tmp_path}"])
    logged = "".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in range(1, 5))
    (tmp_path / "metrics.jsonl").write_text(logged)

    def killed(*args):
        raise Killed

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(Killed):
        MetricsWriter(config, resumed_step=2)  # a resume drops steps 3 and 4
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == logged
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    MetricsWriter(config, resumed_step=2).close()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]


def test_an_index_cache_cut_short_by_a_kill_is_built_again(tmp_path, caplog):
    builder = megatron_datasets().indexed_dataset.IndexedDatasetBuilder(
        str(tmp_path / "c.bin"), dtype=np.uint16
    )
    rng = np.random.default_rng(0)
    for i in range(40):
        builder.add_document(rng.integers(1, 300, 30 + i % 7), [30 + i % 7])
    builder.finalize(str(tmp_path / "c.idx"))

    def build():
        args = ([str(tmp_path / "c")], None, "80,20,0", 16, 0, 300, 0, 64, 16, tmp_path / "cache")
        train, val = build_gpt_datasets(*args)
        return train.samples(0, 64), val.samples(0, 16)

    first = build()
    (shuffle,) = (tmp_path / "cache").glob("*-GPTDataset-train-shuffle_index.npy")
    shuffle.write_bytes(shuffle.read_bytes()[:200])  # np.save killed midway
    again = build()
    assert f"the index cache {shuffle} does not read back" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    caplog.clear()
    build()  # rebuilt whole: read back without a word
    assert "does not read back" not in caplog.text
