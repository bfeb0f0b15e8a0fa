"""Expert parallelism on 2 and 4 gloo processes against single-process references."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from moe_train.config import ConfigError, ParallelConfig
from moe_train.model.moe import is_expert_param
from moe_train.parallel.spawn import RankFailed, run_ranks
from moe_train.parallel.topology import Topology
from moe_train.tools.hydra_config import compose_config
from moe_train.tools.memory import Layout, ModelShapes, native_bytes
from tests.conftest import TINY
from tests.distributed import workers


@pytest.mark.parametrize("ep", [2, 4])
def test_dispatcher_round_trip(tmp_path, ep):
    run_ranks(ep, workers.round_trip, ep, tmp_path, result_dir=tmp_path)
    assert len(list(tmp_path.glob("rank*.ok"))) == ep


@pytest.mark.parametrize("ep,capacity_factor", [(2, None), (4, None), (2, 1.0)])
def test_moe_layer_matches_single_process(tmp_path, ep, capacity_factor):
    """Ranks route 0, 1, 9 and 30 tokens: some ranks send or receive nothing."""
    run_ranks(
        ep, workers.moe_layer_matches_single_process, ep, capacity_factor, tmp_path, result_dir=tmp_path
    )
    assert len(list(tmp_path.glob("rank*.ok"))) == ep


# ---- training equivalence: the same global batch gives the same run at every layout ----

STEPS = ["trainer.max_steps=6", "trainer.eval_every=3", "trainer.ckpt_every=0", "trainer.num_samples=0"]


def train_run(tmp_path: Path, name: str, world: int, ep: int, *extra: str, out_dir: Path | None = None):
    out_dir = out_dir or tmp_path / name
    result_dir = tmp_path / f"{name}-results"
    result_dir.mkdir()
    overrides = [*TINY, *STEPS, f"trainer.out_dir={out_dir}", f"parallel.ep={ep}", *extra]
    run_ranks(world, workers.train, overrides, result_dir, result_dir=result_dir)
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return metrics, full_params(result_dir, world, ep)


def full_params(result_dir: Path, world: int, ep: int) -> dict[str, torch.Tensor]:
    """Rank 0's parameters with the expert shards of ranks 0..ep-1 (one expert-parallel group) joined."""
    shards = [torch.load(result_dir / f"params_rank{r}.pt") for r in range(ep)]
    return {k: torch.cat([s[k] for s in shards]) if is_expert_param(k) else v for k, v in shards[0].items()}


def assert_same_run(metrics, params, ref_metrics, ref_params, rtol=1e-5):
    assert [m["step"] for m in metrics] == [m["step"] for m in ref_metrics]
    for m, ref in zip(metrics, ref_metrics):
        losses = ("loss", "lm_loss", "aux_loss", "device_aux_loss", "z_loss", "mtp_loss")
        for key in (*losses, "grad_norm", "val_loss"):
            if key in ref:
                assert m[key] == pytest.approx(ref[key], rel=rtol), (m["step"], key)
        assert m["expert_load/layer_0"] == pytest.approx(ref["expert_load/layer_0"], abs=1e-5)
    if params is not None:
        assert params.keys() == ref_params.keys()
        # atol 1e-5, 1/300 of one step's largest move (lr 3e-3): Adam divides each gradient by its
        # own magnitude, so where a gradient is near 0, a last-bit difference from summing the
        # experts' rows in another grouping moves a weight by ~1e-6 (seen: 1 of 16,384 entries)
        for k in ref_params:
            torch.testing.assert_close(
                params[k], ref_params[k], rtol=rtol, atol=1e-5, msg=lambda s, k=k: f"{k}: {s}"
            )


REFERENCE_RESULTS: list[Path] = []


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    REFERENCE_RESULTS[:] = [tmp / "single-results"]
    return train_run(tmp, "single", 1, 1)


@pytest.mark.parametrize(
    "world,ep,extra",
    [(2, 2, []), (4, 4, []), (4, 2, []), (2, 1, []), (4, 2, ["parallel.dp_shard=2"])],
    ids=["ep2", "ep4", "dp2xep2", "dp2", "hsdp2x2-ep2"],
)
def test_training_matches_single_process(tmp_path, reference_run, world, ep, extra):
    """FSDP2: dense weights sharded over the world (or over 2 of 4 ranks and replicated: HSDP),
    experts over their expert-data-parallel ranks. Rank 0's weights and Adam's moments take the
    bytes tools.plan counts for the layout, to the byte."""
    metrics, params = train_run(tmp_path, f"w{world}ep{ep}", world, ep, *extra)
    assert_same_run(metrics, params, *reference_run)
    dp_shard = 2 if extra else world
    assert_state_bytes_as_planned(tmp_path / f"w{world}ep{ep}-results", Layout(world, ep, dp_shard))


def assert_state_bytes_as_planned(result_dir: Path, layout: Layout, *extra: str) -> None:
    config = compose_config([*TINY, f"parallel.ep={layout.ep}", *extra])
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=256))
    planned = native_bytes(ModelShapes(config), layout, bf16=False)
    held = json.loads((result_dir / "state_bytes_rank0.json").read_text())
    assert held == {"weights": planned.weights, "optimizer": planned.optimizer}


def test_the_single_process_reference_holds_the_planned_bytes(reference_run, tmp_path_factory):
    assert_state_bytes_as_planned(REFERENCE_RESULTS[0], Layout(1, 1, 1))


def test_activation_checkpointing_at_ep2_matches_single_process(tmp_path, reference_run):
    """The block, exchanges included, runs again in backward."""
    metrics, params = train_run(tmp_path, "recompute", 2, 2, "trainer.activation_checkpointing=true")
    assert_same_run(metrics, params, *reference_run)


def test_capacity_that_drops_nothing_matches_dropless(tmp_path, reference_run):
    metrics, params = train_run(tmp_path, "capacity", 2, 2, "model.moe.capacity_factor=8.0")
    assert all(m["dropped_frac/layer_0"] == 0 for m in metrics)
    assert_same_run(metrics, params, *reference_run)


def test_balancing_by_routing_bias_and_by_device_groups_matches_single_process(tmp_path):
    """DeepSeek-V3's model (MLA, multi-token prediction) and DeepSeek's routing and balancing:
    sigmoid scores, group-limited routing and the scaling factor, the routing bias and a small
    sequence-wise aux loss (DeepSeek-V3), and the device-level loss (DeepSeekMoE). The bias moves from the global batch's counts: every rank moves it alike,
    and as one process does. The device-level loss over two groups of experts (one per rank at
    ep=2) is the same on one process, where both groups are on the same device."""
    balancing = (
        "model.moe.score_function=sigmoid",
        "model.moe.bias_update_rate=0.01",
        "model.moe.aux_loss_coef=0.0001",
        "model.moe.aux_loss_scope=sequence",
        "model.moe.num_expert_groups=2",
        "model.moe.device_aux_loss_coef=0.1",
        "model.moe.topk_groups=1",  # V3's group-limited routing: each token to one rank's experts
        "model.moe.routed_scaling_factor=2.5",
        # and V3's attention: MLA, its query through a latent too
        "model.mla.kv_lora_rank=16",
        "model.mla.q_lora_rank=24",
        "model.mla.qk_nope_head_dim=8",
        "model.mla.qk_rope_head_dim=8",
        "model.mla.v_head_dim=12",
        "model.mtp.num_layers=1",  # and its multi-token prediction, whose block is an MoE one too
    )
    single = train_run(tmp_path, "single", 1, 1, *balancing)
    metrics, params = train_run(tmp_path, "ep2", 2, 2, *balancing)
    assert_same_run(metrics, params, *single)
    assert params["layers.0.ffn.router.expert_bias"].abs().sum() > 0
    assert params["mtp.0.block.ffn.router.expert_bias"].abs().sum() > 0
    for m in metrics:  # one group would give 1.0; the objective weighs it by its coefficient
        assert m["device_aux_loss"] != 1.0
        weighted = 0.0001 * m["aux_loss"] + 0.1 * m["device_aux_loss"] + 0.001 * m["z_loss"]
        weighted += 0.3 * m["mtp_loss"]
        assert m["loss"] == pytest.approx(m["lm_loss"] + weighted)


def test_checkpoint_written_at_4_ranks_ep2_resumes_at_other_layouts(tmp_path, reference_run):
    """Written with dense weights sharded over 4 ranks and experts over 2 (ep=2): resumed on one
    process, on 2 ranks at ep=1 and on 4 at ep=4."""
    saved = tmp_path / "saved"
    train_run(tmp_path, "first-half", 4, 2, "trainer.exit_after_steps=3", out_dir=saved)
    assert (saved / "checkpoints" / "step_00000003" / ".metadata").is_file()
    ref_metrics, ref_params = reference_run
    for world, ep in [(1, 1), (2, 1), (4, 4)]:
        out_dir = tmp_path / f"resumed-w{world}ep{ep}"
        shutil.copytree(saved, out_dir)
        metrics, params = train_run(tmp_path, f"resume-w{world}ep{ep}", world, ep, out_dir=out_dir)
        assert_same_run(metrics, params, ref_metrics, ref_params)


def test_experts_cut_along_dim_1_train_and_resume_as_one_process(tmp_path):
    """6 experts at ep=2 on 4 ranks: a rank's block of 3 experts does not divide over its 2
    expert-data-parallel ranks, so FSDP cuts it along dim 1. Trained there, and stopped at step 3
    and resumed on one process: the single process's run."""
    six = ("model.moe.num_experts=6",)
    single = train_run(tmp_path, "single", 1, 1, *six)
    assert_same_run(*train_run(tmp_path, "dim1", 4, 2, *six), *single)
    assert_state_bytes_as_planned(tmp_path / "dim1-results", Layout(4, 2, 4), *six)
    saved = tmp_path / "saved"
    train_run(tmp_path, "first-half", 4, 2, *six, "trainer.exit_after_steps=3", out_dir=saved)
    assert_same_run(*train_run(tmp_path, "resumed", 1, 1, *six, out_dir=saved), *single)


def test_checkpoints_written_in_the_background_hold_their_step(tmp_path, reference_run):
    """trainer.async_checkpoint at ep=2: the checkpoints of steps 2 and 4 are written while later
    steps train and the step-3 evaluation runs its collectives; resumed from step 4, the run is
    the uninterrupted one."""
    saved = tmp_path / "saved"
    background = ("trainer.ckpt_every=2", "trainer.async_checkpoint=true")
    train_run(tmp_path, "background", 2, 2, *background, out_dir=saved)
    assert sorted(p.name for p in (saved / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    shutil.rmtree(saved / "checkpoints" / "step_00000006")
    metrics, params = train_run(tmp_path, "resumed", 2, 2, *background, out_dir=saved)
    assert_same_run(metrics, params, *reference_run)


# ---- bad layouts and faults ----


def test_world_size_must_be_divisible_by_ep(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(
        ConfigError, match=r"parallel.ep=4 must divide the world size 6 .* allowed ep values: 1, 2, 3, 6"
    ):
        Topology.setup(ParallelConfig(ep=4), "cpu")
    with pytest.raises(
        ConfigError,
        match=r"^parallel.dp_shard=4 must divide the world size 6 .* allowed: -1 \(all\), 1, 2, 3, 6$",
    ):
        Topology.setup(ParallelConfig(dp_shard=4), "cpu")


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_failed_peer_gives_an_error_naming_the_collective(tmp_path, how):
    with pytest.raises(RankFailed) as failed:
        run_ranks(2, workers.peer_fails_during_all_to_all, how, tmp_path, result_dir=tmp_path, timeout=60)
    assert "expert-parallel all_to_all_single (counts) failed on rank 0" in failed.value.errors[0]
    assert float((tmp_path / "elapsed").read_text()) < 30  # the 6 s timeout, not a hang


def test_subgroups_time_out_as_the_world_group_does(tmp_path):
    with pytest.raises(RankFailed):
        run_ranks(4, workers.peer_hangs_in_a_subgroup, tmp_path, result_dir=tmp_path, timeout=60)
    for rank in (0, 2):
        assert float((tmp_path / f"elapsed{rank}").read_text()) < 15  # the 6 s timeout
