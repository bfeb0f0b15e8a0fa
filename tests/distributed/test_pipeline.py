"""Pipeline parallelism on 2 and 4 gloo processes against single-process references: every
schedule torch has, with expert parallelism and FSDP inside the stages, and checkpoints that
resume across pipeline sizes. Runs share spawned groups (starting processes is the slow part)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moe_train.model.moe import is_expert_param
from moe_train.parallel.spawn import RankFailed, run_ranks
from tests.conftest import TINY
from tests.distributed import workers

STEPS = ["trainer.max_steps=5", "trainer.eval_every=5", "trainer.ckpt_every=0", "trainer.num_samples=0"]
FOUR_LAYERS = ["model.num_layers=4"]  # 2 ranks x 2 stages each
DEEPSEEK = [  # DeepSeek-V3's tiny preset with multi-token prediction; routing bias on
    "model=deepseek_v3_tiny",
    *TINY[1:],
    "model.num_layers=4",
    "model.mtp.num_layers=1",
    "model.moe.bias_update_rate=0.01",
]
SCHEDULES = [
    "GPipe",
    "1F1B",
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
]
HALF = ["trainer.exit_after_steps=3"]  # stops at step 3 with a checkpoint


def overrides(tmp: Path, name: str, *extra: str, base=(*TINY, *FOUR_LAYERS)) -> tuple[str, list[str]]:
    return name, [*base, *STEPS, f"trainer.out_dir={tmp / name}", *extra]


def spawn(world: int, tmp: Path, runs: list[tuple[str, list[str]]]) -> None:
    run_ranks(world, workers.train_many, runs, tmp, result_dir=tmp, timeout=600)


def result(tmp: Path, name: str, world: int, pp: int = 1, ep: int = 1):
    """(metrics, whole parameters, sample): the stages' parameters joined, each stage's experts
    from its first expert-parallel group; an embedding two stages hold must be the same."""
    metrics = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    dp = world // pp
    params: dict[str, torch.Tensor] = {}
    for stage in range(pp):
        shards = [torch.load(tmp / name / f"params_rank{stage * dp + r}.pt") for r in range(ep)]
        for k, v in shards[0].items():
            v = torch.cat([s[k] for s in shards]) if is_expert_param(k) else v
            if k in params:
                torch.testing.assert_close(
                    params[k], v, rtol=0, atol=0, msg=f"{k}: the stages' copies differ"
                )
            params[k] = v
    sample = tmp / name / "sample_rank0.pt"
    return metrics, params, torch.load(sample) if sample.exists() else None


def assert_same_run(run, reference, rtol=1e-5):
    """Per-step losses, gradient norms, validation loss and expert loads within rtol; final
    weights within 1e-5; the same sample."""
    (metrics, params, sample), (ref_metrics, ref_params, ref_sample) = run, reference
    assert [m["step"] for m in metrics] == [m["step"] for m in ref_metrics]
    for m, ref in zip(metrics, ref_metrics):
        for key in ref:
            if key.endswith("loss") or key == "grad_norm":
                assert m[key] == pytest.approx(ref[key], rel=rtol), (m["step"], key)
            elif key.startswith("expert_load/"):
                assert m[key] == pytest.approx(ref[key], abs=1e-5), (m["step"], key)
    assert params.keys() == ref_params.keys()
    for k in ref_params:
        torch.testing.assert_close(
            params[k], ref_params[k], rtol=rtol, atol=1e-5, msg=lambda s, k=k: f"{k}: {s}"
        )
    if ref_sample is not None:
        assert torch.equal(sample, ref_sample)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def single(tmp):
    """The one-process references, and a run stopped at step 3 that pp=2 resumes."""
    runs = [
        overrides(tmp, "single"),
        overrides(tmp, "single-tied", "model.tie_embeddings=true"),
        overrides(tmp, "single-deepseek", base=DEEPSEEK),
        overrides(tmp, "single-half", *HALF),
    ]
    spawn(1, tmp, runs)
    return tmp


@pytest.fixture(scope="module")
def two_ranks(single):
    """pp=2 on 2 ranks: each schedule, a tied head, compile with recompute, a run stopped at step 3
    (resumed at pp=1 below) and the single process's stopped run resumed."""
    tmp = single
    shutil.copytree(tmp / "single-half", tmp / "resumed-at-pp2")
    runs = [overrides(tmp, f"pp2-{s}", "parallel.pp=2", f"parallel.pp_schedule={s}") for s in SCHEDULES]
    runs += [
        overrides(tmp, "pp2-tied", "parallel.pp=2", "model.tie_embeddings=true"),
        overrides(
            tmp,
            "pp2-compile",
            "parallel.pp=2",
            "trainer.compile=true",
            "trainer.activation_checkpointing=true",
        ),
        overrides(tmp, "pp2-half", "parallel.pp=2", *HALF),
        overrides(tmp, "resumed-at-pp2", "parallel.pp=2"),
    ]
    spawn(2, tmp, runs)
    return tmp


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_each_schedule_at_pp2_trains_as_one_process(two_ranks, schedule):
    """Losses, gradient norms, evaluation, final weights and a sample after 5 steps: GPipe and 1F1B
    with a stage per rank, the others with 2 (looped, or in a V)."""
    assert_same_run(result(two_ranks, f"pp2-{schedule}", 2, pp=2), result(two_ranks, "single", 1))


def test_a_tied_head_on_the_last_stage_trains_as_one_process(two_ranks):
    """The last stage's copy of the embedding takes the first stage's gradient too."""
    assert_same_run(result(two_ranks, "pp2-tied", 2, pp=2), result(two_ranks, "single-tied", 1))


def test_compiled_and_recomputed_blocks_in_stages_train_as_one_process(two_ranks):
    """Each stage's blocks compiled whole (aot_eager) inside activation checkpointing."""
    assert_same_run(result(two_ranks, "pp2-compile", 2, pp=2), result(two_ranks, "single", 1))


def test_checkpoints_resume_across_pipeline_sizes(two_ranks):
    """Saved at pp=1, resumed at pp=2; saved at pp=2, resumed on one process: the uninterrupted run."""
    tmp = two_ranks
    reference = result(tmp, "single", 1)
    assert_same_run(result(tmp, "resumed-at-pp2", 2, pp=2), reference)
    shutil.copytree(tmp / "pp2-half", tmp / "resumed-at-pp1")
    spawn(1, tmp, [overrides(tmp, "resumed-at-pp1")])
    assert_same_run(result(tmp, "resumed-at-pp1", 1), reference)


def test_pp2_with_expert_parallelism_and_with_fsdp_trains_as_one_process(single):
    """4 ranks. pp=2 x ep=2 on DeepSeek-V3's preset with multi-token prediction (on the last stage,
    with its copy of the embedding) and the routing bias, which every stage moves from the whole
    batch's counts; and pp=2 x dp_shard=2, each stage's weights sharded by FSDP over its 2 ranks."""
    tmp = single
    runs = [
        overrides(tmp, "pp2-ep2-deepseek", "parallel.pp=2", "parallel.ep=2", base=DEEPSEEK),
        overrides(tmp, "pp2-fsdp2", "parallel.pp=2", "parallel.dp_shard=2"),
    ]
    spawn(4, tmp, runs)
    run = result(tmp, "pp2-ep2-deepseek", 4, pp=2, ep=2)
    assert_same_run(run, result(tmp, "single-deepseek", 1))
    assert run[1]["layers.3.ffn.router.expert_bias"].abs().sum() > 0  # on the second stage
    assert run[1]["mtp.0.block.ffn.router.expert_bias"].abs().sum() > 0
    assert_same_run(result(tmp, "pp2-fsdp2", 4, pp=2), result(tmp, "single", 1))


def test_a_stage_that_hangs_stops_the_other_with_an_error_naming_the_pipeline(tmp_path):
    args = [*TINY, f"trainer.out_dir={tmp_path / 'run'}", "parallel.pp=2", "parallel.timeout_minutes=0.05"]
    with pytest.raises(RankFailed) as failed:
        run_ranks(2, workers.pipeline_stage_hangs, args, tmp_path, result_dir=tmp_path, timeout=60)
    assert "pipeline step (send/recv between stages, pp rank 0) failed on rank 0" in failed.value.errors[0]
    assert float((tmp_path / "elapsed").read_text()) < 20  # the 3 s timeout, not a hang
