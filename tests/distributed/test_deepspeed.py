"""engine=deepspeed against the native engine on 2 gloo processes: the same run, fewer optimizer bytes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from moe_train.train.checkpoint import load_model
from tests.distributed.test_expert_parallel import train_run

pytest.importorskip("deepspeed")

STEPS = 5
RUN = [f"trainer.max_steps={STEPS}", "trainer.eval_every=5"]


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """Native engine on 2 ranks at ep=1 and ep=2: the reference runs."""
    tmp = tmp_path_factory.mktemp("native")
    return {ep: train_run(tmp, f"native-ep{ep}", 2, ep, *RUN) for ep in (1, 2)}


def optim_entries(checkpoint) -> set[str]:
    """The kinds of optimizer state a checkpoint holds: 'fp32', 'exp_avg', 'exp_avg_sq', 'step'."""
    keys = dcp.FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    return {k.split(".")[1] for k in keys if k.startswith("optim.")}


def assert_matches(metrics, params, ref_metrics, ref_params, rtol):
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for m, ref in zip(metrics, ref_metrics):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "val_loss"):
            if key in ref:
                assert m[key] == pytest.approx(ref[key], rel=rtol), (m["step"], key)
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, rtol=rtol, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("ep", [1, 2])
def test_zero_matches_native(tmp_path, native, stage, ep):
    metrics, params = train_run(tmp_path, "ds", 2, ep, *RUN, "engine=deepspeed", f"engine.zero_stage={stage}")
    ref_metrics, ref_params = native[ep]
    assert_matches(metrics, params, ref_metrics, ref_params, rtol=1e-4)

    # memory, measured from the optimizer's tensors on rank 0 (logged at step 1): ZeRO splits the
    # moments as the native engine's FSDP does (dense over 2 ranks; experts over their edp ranks,
    # one at ep=2), padding aside, and keeps an fp32 master copy the native engine does not need
    ours, ref = metrics[0]["optimizer_moments_mb"], ref_metrics[0]["optimizer_moments_mb"]
    assert ours == pytest.approx(ref, rel=0.02)
    assert metrics[0]["optimizer_master_weights_mb"] == pytest.approx(ours / 2, rel=0.02)


def test_offload_matches_native(tmp_path, native):
    """ZeRO-Offload: states on the CPU, stepped by DeepSpeed's CPU Adam (a C++ op built on first use)."""
    overrides = (*RUN, "engine=deepspeed", "engine.zero_stage=2", "engine.offload_optimizer=true")
    metrics, params = train_run(tmp_path, "offload", 2, 2, *overrides)
    assert_matches(metrics, params, *native[2], rtol=1e-4)


def test_resume_at_the_same_and_at_other_layouts(tmp_path, native):
    """Stop a ZeRO-2 run at (2 ranks, ep=2) after 3 steps and resume it to 5: at the same layout; at
    ZeRO-1 on (2 ranks, ep=1), where the experts' states are partitioned over 2 ranks instead of
    each rank keeping its own experts' whole; and on 1 process with ZeRO-Offload (DeepSpeed's CPU
    Adam, which counts steps in an int). The uninterrupted run's losses and weights each time (the
    native runs at ep=1 and ep=2 are the same run, to rounding). The checkpoint is written in the
    background (trainer.async_checkpoint), ZeRO's fragments copied to host memory first."""
    saved = tmp_path / "saved"
    args = (*RUN, "engine=deepspeed", "trainer.ckpt_every=3")
    first, _ = train_run(
        tmp_path,
        "first",
        2,
        2,
        *args,
        "engine.zero_stage=2",
        "trainer.exit_after_steps=3",
        "trainer.async_checkpoint=true",
        out_dir=saved,
    )
    assert [m["step"] for m in first] == [1, 2, 3]
    # an fp32 run's master weights are its weights: not stored twice, restored from the weights
    assert optim_entries(saved / "checkpoints" / "step_00000003") == {"exp_avg", "exp_avg_sq", "step"}
    (saved / "metrics.jsonl").rename(tmp_path / "first.jsonl")
    ref_metrics, ref_params = native[2]
    layouts = {
        "same": (2, 2, "engine.zero_stage=2"),
        "zero1-ep1": (2, 1, "engine.zero_stage=1"),
        "offload-1-rank": (1, 1, "engine.offload_optimizer=true"),
    }
    for name, (world, ep, zero) in layouts.items():
        run = tmp_path / name
        shutil.copytree(saved, run)
        resumed, params = train_run(tmp_path, f"{name}-ranks", world, ep, *args, zero, out_dir=run)
        assert [m["step"] for m in resumed] == [4, 5], name
        assert_matches(first + resumed, params, ref_metrics, ref_params, rtol=1e-4)

    # the tools and trainer.init_from read it as any checkpoint: the trained weights at any ep
    _, model = load_model(run)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, params[name], rtol=0, atol=0, msg=name)
    init = ("trainer.max_steps=2", "trainer.eval_every=2")
    from_ds, _ = train_run(tmp_path, "init", 2, 2, *init, f"trainer.init_from={run}")
    assert from_ds[0]["loss"] < ref_metrics[0]["loss"] - 0.01  # the trained weights, not a fresh model


def test_resume_under_the_other_engine_is_refused(tmp_path):
    """The optimizer state of one engine does not resume under the other (one line); the native
    engine can still start from the weights."""
    run = tmp_path / "run"
    train_run(
        tmp_path, "ds", 2, 1, "trainer.max_steps=2", "engine=deepspeed", "trainer.ckpt_every=2", out_dir=run
    )
    with pytest.raises(Exception, match="written by engine=deepspeed and this run uses engine=native"):
        train_run(tmp_path, "native", 2, 1, "trainer.max_steps=4", "trainer.resume=auto", out_dir=run)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_bf16_resume_restores_the_master_weights(tmp_path):
    """In bf16 DeepSpeed keeps the weights in bf16 and the fp32 master copy apart; the checkpoint
    holds the master, and a run stopped at step 3 resumes to step 5 exactly as it would have run."""
    args = (*RUN, "engine=deepspeed", "engine.zero_stage=2", "trainer.precision=bf16", "trainer.ckpt_every=3")
    ref_metrics, ref_params = train_run(tmp_path, "whole", 2, 2, *args)
    saved = tmp_path / "saved"
    first, _ = train_run(tmp_path, "first", 2, 2, *args, "trainer.exit_after_steps=3", out_dir=saved)
    assert optim_entries(saved / "checkpoints" / "step_00000003") == {"fp32", "exp_avg", "exp_avg_sq", "step"}
    (saved / "metrics.jsonl").rename(tmp_path / "first.jsonl")
    resumed, params = train_run(tmp_path, "resumed", 2, 2, *args, out_dir=saved)
    assert [m["step"] for m in resumed] == [4, 5]
    assert_matches(first + resumed, params, ref_metrics, ref_params, rtol=1e-6)
