"""engine=deepspeed against the native engine on 2 gloo processes: the same run, fewer optimizer bytes."""

from __future__ import annotations

import json

import pytest
import torch

from moe_train.config import ConfigError
from moe_train.tools.convert_deepspeed import convert
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
    # ZeRO-2 at ep=2 also runs the overlapped all-to-all: its experts' backward runs reentrantly,
    # inside DeepSpeed's gradient hooks, and must still give the native (unchunked) run
    overlap = [f"parallel.ep_overlap_chunks={2 if (stage, ep) == (2, 2) else 1}"]
    metrics, params = train_run(
        tmp_path, "ds", 2, ep, *RUN, "engine=deepspeed", f"engine.zero_stage={stage}", *overlap
    )
    ref_metrics, ref_params = native[ep]
    assert_matches(metrics, params, ref_metrics, ref_params, rtol=1e-4)

    # memory, measured from the optimizer's tensors on rank 0 (logged at step 1)
    ours, ref = metrics[0]["optimizer_moments_mb"], ref_metrics[0]["optimizer_moments_mb"]
    if ep == 1:  # every parameter's Adam moments split over the 2 ranks
        assert ours == pytest.approx(ref / 2, rel=0.02)
    else:  # dense moments split over 2, expert moments kept whole (their edp group is one rank)
        assert ref / 2 < ours < ref
    assert metrics[0]["optimizer_master_weights_mb"] == pytest.approx(ours / 2, rel=0.02)


def test_offload_matches_native(tmp_path, native):
    """ZeRO-Offload: states on the CPU, stepped by DeepSpeed's CPU Adam (a C++ op built on first use)."""
    overrides = (*RUN, "engine=deepspeed", "engine.zero_stage=2", "engine.offload_optimizer=true")
    metrics, params = train_run(tmp_path, "offload", 2, 2, *overrides)
    assert_matches(metrics, params, *native[2], rtol=1e-4)


def test_resume_and_convert(tmp_path, native):
    """Stop after 3 steps, resume to 5 through DeepSpeed's checkpoint: the uninterrupted run's losses.
    Then the checkpoint converts to the native format with the trained weights."""
    run = tmp_path / "run"
    args = (*RUN, "engine=deepspeed", "engine.zero_stage=2", "trainer.ckpt_every=3")
    first, _ = train_run(tmp_path, "first", 2, 2, *args, "trainer.exit_after_steps=3", out_dir=run)
    assert [m["step"] for m in first] == [1, 2, 3]
    assert (run / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt").is_file()
    (run / "metrics.jsonl").rename(tmp_path / "first.jsonl")
    resumed, params = train_run(tmp_path, "second", 2, 2, *args, out_dir=run)
    ref_metrics, ref_params = native[2]
    assert [m["step"] for m in resumed] == [4, 5]
    assert_matches(first + resumed, params, ref_metrics, ref_params, rtol=1e-4)

    last = run / "checkpoints" / "step_00000005"
    _, direct = load_model(last)  # the tools read a DeepSpeed checkpoint as it is
    out = convert(run, tmp_path / "converted")
    _, converted = load_model(out)
    for name, p in converted.state_dict().items():
        torch.testing.assert_close(p, params[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(direct.state_dict()[name], p, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="not a DeepSpeed checkpoint"):
        convert(out, tmp_path / "again")

    # trainer.init_from takes either format at any ep: from the DeepSpeed run at ep=2 (its newest
    # checkpoint, `last`; each rank slicing its experts) as from the converted one (DCP resharding),
    # the same run
    init = ("trainer.max_steps=2", "trainer.eval_every=2")
    from_ds, ds_params = train_run(tmp_path, "init-ds", 2, 2, *init, f"trainer.init_from={run}")
    from_native, native_params = train_run(tmp_path, "init-native", 2, 2, *init, f"trainer.init_from={out}")
    assert [m["loss"] for m in from_ds] == [m["loss"] for m in from_native]
    assert from_ds[0]["loss"] < ref_metrics[0]["loss"] - 0.01  # the trained weights, not a fresh model
    for name, p in native_params.items():
        torch.testing.assert_close(ds_params[name], p, rtol=0, atol=0, msg=name)


def test_resume_across_engines_or_layouts_is_refused(tmp_path, native):
    """A DeepSpeed checkpoint does not resume under engine=native, nor at another ep (one line each)."""
    run = tmp_path / "run"
    train_run(
        tmp_path, "ds", 2, 1, "trainer.max_steps=2", "engine=deepspeed", "trainer.ckpt_every=2", out_dir=run
    )
    with pytest.raises(Exception, match="written by engine=deepspeed and this run uses engine=native"):
        train_run(tmp_path, "native", 2, 1, "trainer.max_steps=4", "trainer.resume=auto", out_dir=run)
    with pytest.raises(Exception, match="was written with parallel.ep=1 and resumes only at that layout"):
        train_run(tmp_path, "ep2", 2, 2, "trainer.max_steps=4", "engine=deepspeed", out_dir=run)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
