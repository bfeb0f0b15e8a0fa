"""Training runs end to end: the CLI, exact resume, early exit, atomic checkpoints, bad input."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_train.config import ConfigError, MTPConfig
from moe_train.model import Transformer
from moe_train.parallel.spawn import free_port
from moe_train.parallel.topology import Topology
from moe_train.tools.hydra_config import compose_config
from moe_train.train.checkpoint import load_config, load_model, load_weights, save_weights
from moe_train.train.metrics import read_metrics
from moe_train.train.trainer import Diverged, Trainer
from tests.conftest import losses, train

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "extra",
    [[], ["model.mtp.num_layers=2", "trainer.activation_checkpointing=true"]],
    ids=["plain", "mtp-recompute"],
)
def test_resume_is_bit_exact(tmp_path, tiny_overrides, extra):
    common = [
        *tiny_overrides[:-1],
        "trainer.max_steps=20",
        "trainer.eval_every=10",
        "trainer.ckpt_every=0",
        *extra,
    ]
    whole = train([*common, f"trainer.out_dir={tmp_path / 'whole'}"])
    split_dir = tmp_path / "split"
    first = train([*common, f"trainer.out_dir={split_dir}", "trainer.exit_after_steps=10"])
    assert [m["step"] for m in first][-1] == 10
    assert sorted(p.name for p in (split_dir / "checkpoints").iterdir()) == ["step_00000010"]
    resumed = train([*common, f"trainer.out_dir={split_dir}"])
    assert losses(resumed) == losses(whole)  # bit for bit: floats compared exactly
    assert [m.get("val_loss") for m in resumed] == [m.get("val_loss") for m in whole]
    if extra:  # the MTP depths' MoE blocks are layers 2 and 3
        assert [m["mtp_loss"] for m in resumed] == [m["mtp_loss"] for m in whole]
        assert "expert_load/layer_3" in resumed[-1]


def test_wsd_run_extended_before_its_decay_trains_on_as_if_planned_that_long(tmp_path, tiny_overrides):
    common = [*tiny_overrides[:-1], "optim.schedule=wsd", "optim.decay_fraction=0.25", "optim.warmup_steps=2"]
    common += ["trainer.eval_every=0"]
    planned = train([*common, "trainer.max_steps=16", f"trainer.out_dir={tmp_path / 'planned'}"])
    short = tmp_path / "short"  # planned for 8 steps, so its decay starts at step 6: stopped there
    train([*common, "trainer.max_steps=8", "trainer.exit_after_steps=6", f"trainer.out_dir={short}"])
    extended = train([*common, "trainer.max_steps=16", f"trainer.out_dir={short}"])
    assert losses(extended) == losses(planned)
    assert [m["lr"] for m in extended] == [m["lr"] for m in planned]


def test_resume_auto_takes_newest_complete_checkpoint_and_ignores_partial(tmp_path, tiny_overrides):
    overrides = [*tiny_overrides, "trainer.max_steps=6", "trainer.ckpt_every=2", "trainer.keep_last=2"]
    train([*overrides, "trainer.exit_after_steps=4"])
    ckpts = Path(compose_config(overrides).trainer.out_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004"]
    # a save that crashed midway: folder present, no rename, no .metadata
    (ckpts / "step_00000006.tmp").mkdir()
    (ckpts / "step_00000006.tmp" / "__0_0.distcp").write_bytes(b"partial")
    metrics = train(overrides)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000004", "step_00000006"]


def test_resume_from_an_earlier_checkpoint_of_the_run_sets_the_later_ones_aside(tmp_path, tiny_overrides):
    """Going back (before an instability, say) starts a new timeline: the later checkpoints of the
    old one move to checkpoints/superseded/, keep_last prunes this timeline only, resume=auto
    continues it, and metrics.jsonl holds each step once."""
    overrides = [*tiny_overrides, "trainer.max_steps=8", "trainer.ckpt_every=2", "trainer.eval_every=0"]
    train(overrides)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000006", "step_00000008"]
    branch = [f"trainer.resume={ckpts / 'step_00000006'}", "trainer.keep_last=1", "optim.lr=1e-3"]
    train([*overrides, *branch, "trainer.exit_after_steps=1"])
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000007"]  # the one just saved
    (aside,) = (ckpts / "superseded").iterdir()
    assert [p.name for p in aside.iterdir()] == ["step_00000008"]
    metrics = train([*overrides, "trainer.keep_last=1", "optim.lr=1e-3"])
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000008"]
    assert load_config(ckpts / "step_00000008").optim.lr == 1e-3


def test_a_second_run_in_the_same_directory_is_refused_while_the_first_holds_it(tmp_path, tiny_overrides):
    import fcntl

    overrides = [*tiny_overrides, "trainer.max_steps=1", "trainer.eval_every=0"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with (run_dir / ".lock").open("a+") as other:  # as another process's run holds it
        other.write("node7 pid 4242\n")
        other.flush()
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(
            ConfigError, match=r"another run is using trainer.out_dir=.*run \(node7 pid 4242\)"
        ):
            train(overrides)
    assert not (run_dir / "checkpoints").exists()  # nothing touched
    assert [m["step"] for m in train(overrides)] == [1]  # once it is gone (the kernel frees a dead one's)
    assert [m["step"] for m in train([*overrides, "trainer.max_steps=2"])] == [1, 2]  # released at the end


def test_a_damaged_newest_checkpoint_names_the_older_one_to_resume_from(tmp_path, tiny_overrides):
    overrides = [*tiny_overrides, "trainer.max_steps=2", "trainer.ckpt_every=1", "trainer.eval_every=0"]
    train(overrides)
    ckpts = tmp_path / "run" / "checkpoints"
    shard = next((ckpts / "step_00000002").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    longer = [*overrides, "trainer.max_steps=3"]
    with pytest.raises(
        ConfigError, match=r"ends too early.*older checkpoint may be intact: trainer.resume=.*step_00000001$"
    ):
        train(longer)
    assert [m["step"] for m in train([*longer, f"trainer.resume={ckpts / 'step_00000001'}"])] == [1, 2, 3]


def test_a_metrics_line_cut_short_by_a_crash_does_not_stop_a_resume(tmp_path, tiny_overrides):
    overrides = [*tiny_overrides, "trainer.max_steps=4", "trainer.eval_every=0"]
    train([*overrides, "trainer.exit_after_steps=2"])
    metrics_file = tmp_path / "run" / "metrics.jsonl"
    with metrics_file.open("a") as f:
        f.write('{"step": 3, "loss": 5.')  # the crash came mid-write
    assert [m["step"] for m in train(overrides)] == [1, 2, 3, 4]


def test_a_run_started_from_init_from_resumes_after_its_source_is_gone(tmp_path, tiny_overrides):
    """init_from is needed once: a requeued job resumes from the run's own checkpoints."""
    source = tmp_path / "source"
    train(
        [*tiny_overrides[:-1], f"trainer.out_dir={source}", "trainer.max_steps=1", "model.moe.num_experts=4"]
    )
    overrides = [
        *tiny_overrides,
        f"trainer.init_from={source}",
        "trainer.max_steps=4",
        "trainer.eval_every=0",
    ]
    train([*overrides, "trainer.exit_after_steps=2"])
    shutil.rmtree(source)
    assert [m["step"] for m in train(overrides)] == [1, 2, 3, 4]
    assert load_config(tmp_path / "run" / "checkpoints" / "step_00000004").model.moe.num_experts == 4


def test_resume_none_refuses_to_overwrite_and_finished_run_does_nothing(tmp_path, tiny_overrides):
    overrides = [*tiny_overrides, "trainer.max_steps=2"]
    train(overrides)
    with pytest.raises(ConfigError, match="already has checkpoints"):
        train([*overrides, "trainer.resume=none"])
    assert len(train(overrides)) == 2  # resume=auto at max_steps: nothing more is logged
    with pytest.raises(ConfigError, match="is not a complete checkpoint"):
        train([*overrides, f"trainer.resume={tmp_path / 'missing'}"])


def test_resume_from_checkpoint_of_another_model_or_a_damaged_one_fails_clearly(tmp_path, tiny_overrides):
    train([*tiny_overrides, "trainer.max_steps=1"])
    ckpt = next((tmp_path / "run" / "checkpoints").iterdir())
    other = [*tiny_overrides[:-1], f"trainer.out_dir={tmp_path / 'other'}", "trainer.max_steps=2"]
    with pytest.raises(
        ConfigError, match=f"^checkpoint {ckpt} has model.dim=64 but this run asks for model.dim=32"
    ):
        train([*other, "model.dim=32", f"trainer.resume={ckpt}"])
    with pytest.raises(
        ConfigError, match="has model.tie_embeddings=false but this run asks for model.tie_em"
    ):
        train([*tiny_overrides, "model.tie_embeddings=true", "trainer.max_steps=2"])  # one parameter fewer
    with pytest.raises(ConfigError, match="it holds .* model tensors this model lacks, e.g. layers.1."):
        train([*other, "model.num_layers=1", f"trainer.init_from={ckpt}"])  # not silently dropped
    config_yaml = (ckpt / "config.yaml").read_text()
    (ckpt / "config.yaml").write_text("model: [")
    with pytest.raises(ConfigError, match="config.yaml is damaged"):
        train([*tiny_overrides, "trainer.max_steps=2"])
    # a setting an older version wrote and this one retired is left out; an unknown one is damage
    (ckpt / "config.yaml").write_text(
        config_yaml.replace("parallel:\n", "parallel:\n  ep_overlap_chunks: 1\n")
    )
    assert load_config(ckpt).parallel.ep == 1
    (ckpt / "config.yaml").write_text(config_yaml.replace("parallel:\n", "parallel:\n  ep_overlap: 1\n"))
    with pytest.raises(ConfigError, match="config.yaml is damaged: Key 'ep_overlap' not in 'ParallelConfig'"):
        load_config(ckpt)
    (ckpt / "config.yaml").write_text(config_yaml)
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="cannot load checkpoint .*: one of its files ends too early"):
        train([*tiny_overrides, "trainer.max_steps=2"])
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [ckpt.name]  # nothing written


def test_metrics_have_the_documented_keys(tmp_path, tiny_overrides):
    metrics = train([*tiny_overrides, "trainer.max_steps=3", "trainer.eval_every=3"])
    last = metrics[-1]
    for key in (
        "step",
        "loss",
        "lm_loss",
        "aux_loss",
        "z_loss",
        "lr",
        "grad_norm",
        "tokens_per_sec",
        "val_loss",
    ):
        assert key in last
    load = last["expert_load/layer_0"]
    assert len(load) == 8 and abs(sum(load) - 1) < 1e-3
    assert last["load_imbalance/layer_1"] == pytest.approx(max(last["expert_load/layer_1"]) * 8, rel=1e-3)


def cli(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("engine", ["native", "deepspeed"])
def test_cli_trains_writes_metrics_and_prints_samples(tmp_path, tiny_overrides, engine):
    """Either engine: the same metrics, validation, samples, checkpoints and wandb run."""
    result = cli(
        *tiny_overrides,
        "trainer.max_steps=4",
        "trainer.eval_every=2",
        "logging.wandb.mode=offline",
        f"engine={engine}",
        "model.mtp.num_layers=1",
    )
    assert result.returncode == 0, result.stderr
    assert "----- sample 1 -----" in result.stdout
    run_dir = tmp_path / "run"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for m in lines:  # mixtral_tiny's router loss weights, and multi-token prediction's
        weighted = 0.01 * m["aux_loss"] + 0.001 * m["z_loss"] + 0.3 * m["mtp_loss"]
        assert m["loss"] == pytest.approx(m["lm_loss"] + weighted, rel=1e-6)
    assert (run_dir / "checkpoints" / "step_00000004" / "config.yaml").is_file()
    assert any((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["model=nope"], "error: model=nope is not a preset"),
        (["model.moe.top_k=9"], "error: model.moe.top_k=9 must be between 1 and model.moe.num_experts=8"),
        (["optim.lr=-1"], "error: optim.lr=-1.0 must be a positive number"),
        (["trainer.global_batch_size=6", "trainer.micro_batch_size=4"], "error: trainer.global_batch_size=6"),
        (
            ["engine=deepspeed", "engine.zero_stage=3"],
            "error: engine.zero_stage=3: DeepSpeed does not support",
        ),
    ],
)
def test_cli_bad_input_one_line_exit_2(args, message, tmp_path):
    result = cli(*args, f"trainer.out_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "checkpoints").exists()


DIVERGING = ["optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0", "trainer.ckpt_every=1"]


@pytest.mark.parametrize("background", [False, True])
def test_a_diverging_run_stops_before_saving_and_leaves_the_weights(tmp_path, tiny_overrides, background):
    """Step 1's update (lr 1e30) makes step 2's loss and gradients overflow: the run stops there,
    its checkpoint at step 1 the newest (completed first if written in the background), and the
    native engine does not apply the step."""
    overrides = [*DIVERGING, "trainer.eval_every=0", f"trainer.async_checkpoint={background}"]
    config = compose_config([*tiny_overrides, *overrides])
    topology = Topology.setup(config.parallel, "cpu")
    try:
        trainer = Trainer(config, topology)
        with pytest.raises(
            Diverged, match=r"^step 2 diverged: .* newest checkpoint is .*step_00000001: resume"
        ):
            trainer.fit()
    finally:
        topology.close()
    run_dir = tmp_path / "run"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000001"]
    assert [m["step"] for m in read_metrics(run_dir)] == [1]
    _, saved = load_model(run_dir / "checkpoints" / "step_00000001")
    for name, value in saved.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], value), name


def test_cli_diverging_run_one_line_exit_1(tmp_path, tiny_overrides):
    result = cli(*tiny_overrides, *DIVERGING, "engine=deepspeed")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: step 2 diverged: loss ")
    assert "Traceback" not in result.stderr
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000001"]


def torchrun(*args):
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    return subprocess.run(
        [*command, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_torchrun_two_processes_expert_parallel(tmp_path, tiny_overrides):
    """The real launcher: torchrun's environment, gloo, rank 0 alone writes metrics and logs. The
    micro-batch size left at its default (null): each rank takes its half of the global batch."""
    result = torchrun(
        *tiny_overrides,
        "trainer.micro_batch_size=null",
        "parallel.ep=2",
        "trainer.max_steps=3",
        "trainer.eval_every=3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert "val_loss" in metrics[-1]
    assert (tmp_path / "run" / "checkpoints" / "step_00000003" / ".metadata").is_file()
    assert (result.stdout + result.stderr).count("saved ") == 1

    bad = torchrun(*tiny_overrides, "parallel.ep=4", "trainer.max_steps=3")
    assert bad.returncode != 0
    assert "error: parallel.ep=4 must divide the world size 2" in bad.stderr


def test_init_from_brings_the_architecture_and_model_overrides_apply_over_it(tmp_path, tiny_overrides):
    """The source run is a DBRX-like model; the new run names no preset (or another), so its composed
    model is mixtral_tiny: the checkpoint's architecture wins, and the command line's model.* values
    win over it (through train.py, whose overrides come from Hydra, and through compose_config)."""
    source = [o for o in tiny_overrides if not o.startswith("model=")] + ["model=dbrx_tiny"]
    train([*source, "trainer.max_steps=1", "trainer.num_samples=0"])
    rest = [o for o in tiny_overrides if not o.startswith(("model", "trainer.out_dir"))]
    new = [*rest, f"trainer.init_from={tmp_path / 'run'}", "model.moe.aux_loss_coef=0.05"]
    result = cli(*new, f"trainer.out_dir={tmp_path / 'new'}", "trainer.max_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    written = load_config(next((tmp_path / "new" / "checkpoints").iterdir())).model
    expected = load_config(next((tmp_path / "run" / "checkpoints").iterdir())).model
    expected.moe.aux_loss_coef = 0.05
    assert written == expected
    composed = compose_config(new)
    assert composed.model == expected
    assert composed.trainer.init_from == str(next((tmp_path / "run" / "checkpoints").iterdir()))
    assert compose_config([*new, "model=mixtral_tiny"]).model == expected  # a preset is not applied


def test_auxiliary_loss_free_balancing_from_a_checkpoint_without_it_resumes_exactly(tmp_path, tiny_overrides):
    """A run without the routing bias, continued (trainer.init_from) with it turned on: the bias
    starts at zero, moves, is checkpointed, and a resumed run matches the uninterrupted one bit for
    bit. An export to Hugging Face refuses it (the formats have no routing bias)."""
    from moe_train.tools.export_hf import export

    base = [o for o in tiny_overrides if not o.startswith("trainer.out_dir")]
    train([*base, f"trainer.out_dir={tmp_path / 'plain'}", "trainer.max_steps=2", "trainer.num_samples=0"])
    balanced = [*base, f"trainer.init_from={tmp_path / 'plain'}", "model.moe.bias_update_rate=0.01"]
    balanced += [
        "model.moe.aux_loss_coef=0",
        "trainer.max_steps=6",
        "trainer.eval_every=0",
        "trainer.ckpt_every=0",
    ]
    whole = train([*balanced, f"trainer.out_dir={tmp_path / 'whole'}"])
    train([*balanced, f"trainer.out_dir={tmp_path / 'split'}", "trainer.exit_after_steps=3"])
    resumed = train([*balanced, f"trainer.out_dir={tmp_path / 'split'}"])
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]  # the same metrics.jsonl, continued
    assert losses(resumed) == losses(whole)
    assert [m["expert_load/layer_0"] for m in resumed] == [m["expert_load/layer_0"] for m in whole]
    _, model = load_model(tmp_path / "whole")
    bias = model.layers["0"].ffn.router.expert_bias
    assert bias.abs().sum() > 0 and torch.allclose(bias * 100, (bias * 100).round())  # steps of 0.01
    with pytest.raises(ConfigError, match="router.expert_bias is not zero"):
        export(tmp_path / "whole", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_init_from_can_add_multi_token_prediction_and_drop_it_again(tmp_path, tiny_overrides):
    """Continued pretraining (trainer.init_from, a fresh optimizer) may turn multi-token prediction
    on over a model that had none: the main weights load, the new depth starts from its
    initialisation. And off again: the checkpoint's depth is left out. Resuming a run is stricter."""
    base = [o for o in tiny_overrides if not o.startswith("trainer.out_dir")]
    short = ["trainer.max_steps=2", "trainer.num_samples=0", "trainer.eval_every=0"]
    # two checkpoints: refusing to resume with other depths must not point to the older one
    train([*base, *short, "trainer.ckpt_every=1", f"trainer.out_dir={tmp_path / 'plain'}"])
    with_mtp = train(
        [*base, *short, f"trainer.init_from={tmp_path / 'plain'}", "model.mtp.num_layers=1",
         f"trainer.out_dir={tmp_path / 'mtp'}"]
    )  # fmt: skip
    assert all("mtp_loss" in m for m in with_mtp)
    config, continued = load_model(tmp_path / "mtp")
    assert config.model.mtp.num_layers == 1 and "mtp.0.eh_proj.weight" in continued.state_dict()
    without = train(
        [*base, *short, f"trainer.init_from={tmp_path / 'mtp'}", "model.mtp.num_layers=0",
         f"trainer.out_dir={tmp_path / 'again'}"]
    )  # fmt: skip
    assert not any("mtp_loss" in m for m in without)
    assert load_config(next((tmp_path / "again" / "checkpoints").iterdir())).model.mtp.num_layers == 0
    # whole depths only: a second depth starts fresh beside the loaded first one
    two = Transformer(dataclasses.replace(config.model, mtp=MTPConfig(num_layers=2)))
    fresh = {k: v.clone() for k, v in two.state_dict().items()}
    checkpoint = next((tmp_path / "mtp" / "checkpoints").iterdir())
    load_weights(checkpoint, two)
    loaded = continued.state_dict()
    for key, value in two.state_dict().items():
        assert torch.equal(value, fresh[key] if key.startswith("mtp.1.") else loaded[key]), key

    # a depth whose block changed kind (MoE in the checkpoint, dense here) is not half loaded
    def every(n):  # layers 0 and 1 are MoE and dense for n = 2 and 3; the depth's block (2) is not
        moe = dataclasses.replace(config.model.moe, every_n_layers=n)
        return dataclasses.replace(config, model=dataclasses.replace(config.model, moe=moe))

    source = save_weights(every(2), Transformer(every(2).model), tmp_path / "every2")
    with pytest.raises(ConfigError, match="model tensors this model lacks, e.g. mtp.0.block.ffn."):
        load_weights(source, Transformer(every(3).model))
    with pytest.raises(ConfigError, match=(
        "has model.mtp.num_layers=0 but this run asks for model.mtp.num_layers=1: resume with the "
        r"checkpoint's value, or add or drop depths in a new run started from it \(trainer.init_from\)$"
    )):  # fmt: skip
        train(
            [*base, "trainer.max_steps=4", "model.mtp.num_layers=1", f"trainer.out_dir={tmp_path / 'plain'}"]
        )


def test_the_trainer_leaves_the_callers_config_alone(tmp_path, tiny_overrides):
    """The vocabulary follows the tokenizer and the micro-batch size the layout in the trainer's
    own config; the caller's keeps its unset values (a second Trainer from it resolves them again)."""
    config = compose_config([*tiny_overrides, "trainer.micro_batch_size=null"])
    assert config.model.vocab_size is None
    topology = Topology.setup(config.parallel, "cpu")
    try:
        trainer = Trainer(config, topology)
    finally:
        topology.close()
    assert trainer.config.model.vocab_size == 256 and trainer.config.trainer.micro_batch_size is not None
    assert config.model.vocab_size is None and config.trainer.micro_batch_size is None
