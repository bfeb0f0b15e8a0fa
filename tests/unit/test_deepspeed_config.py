"""The DeepSpeed configuration built from ours, and the user's JSON over it."""

from __future__ import annotations

import json

import pytest

from moe_train.config import ConfigError
from moe_train.tools.hydra_config import compose_config

deepspeed_engine = pytest.importorskip("moe_train.train.deepspeed_engine")


def build(tmp_path, user: dict | str | None = None, *overrides: str) -> dict:
    extra = []
    if user is not None:
        path = tmp_path / "ds.json"
        path.write_text(user if isinstance(user, str) else json.dumps(user))
        extra = [f"engine.deepspeed_config={path}"]
    config = compose_config(
        ["engine=deepspeed", "trainer.global_batch_size=16", "trainer.micro_batch_size=2", *extra, *overrides]
    )
    return deepspeed_engine.deepspeed_config(config, micro_batches=4, bf16=False)


def test_built_from_our_config(tmp_path):
    ds = build(tmp_path, None, "engine.zero_stage=2", "engine.offload_optimizer=true", "optim.grad_clip=0.5")
    assert ds["train_batch_size"] == 16
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert ds["bf16"] == {"enabled": False}


def test_user_json_merges_over_it(tmp_path):
    ds = build(tmp_path, {"zero_optimization": {"reduce_bucket_size": 1000}, "train_batch_size": 16})
    assert ds["zero_optimization"] == {
        "stage": 1,
        "offload_optimizer": {"device": "none"},
        "reduce_bucket_size": 1000,
    }


@pytest.mark.parametrize(
    "user,message",
    [
        ({"train_batch_size": 32}, "sets train_batch_size=32, but the run has train_batch_size=16"),
        ({"gradient_accumulation_steps": 2}, "sets gradient_accumulation_steps=2, but the run has"),
        (
            {"optimizer": {"type": "SGD"}},
            "has an 'optimizer' section; the optimizer and schedule come from optim.*",
        ),
        (
            {"zero_optimization": {"stage": 3}},
            "zero_optimization.stage=3: DeepSpeed does not support ZeRO stage 3",
        ),
        ({"zero_optimization": {"stage": 0}}, "zero_optimization.stage=0 shards nothing"),
        # what our config owns and each checkpoint's config.yaml records
        ({"gradient_clipping": 0.01}, "sets gradient_clipping: set optim.grad_clip instead"),
        ({"bf16": {"enabled": True}}, "sets bf16: set trainer.precision instead"),
        ({"fp16": {"enabled": True}}, "sets fp16: set trainer.precision (bf16 or fp32;"),
        ({"zero_optimization": 2}, "zero_optimization must be an object"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
    ],
)
def test_bad_user_json_is_one_line(tmp_path, user, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("*", r"\*")) as error:
        build(tmp_path, user)
    assert "\n" not in str(error.value)


def test_missing_user_json(tmp_path):
    config = compose_config(["engine=deepspeed", f"engine.deepspeed_config={tmp_path / 'nope.json'}"])
    with pytest.raises(ConfigError, match="nope.json: cannot read it"):
        deepspeed_engine.deepspeed_config(config, micro_batches=1, bf16=False)


def test_a_build_lock_left_by_a_killed_build_is_named(tmp_path, monkeypatch):
    """torch's extension loader would wait on it forever; a fresh lock (a build in progress) is
    waited on as usual."""
    import os
    import time

    from moe_train.train.deepspeed_engine import refuse_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    refuse_stale_build_locks()  # being built right now: fine
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with pytest.raises(
        ConfigError, match=r"deepspeed_shm_comm/lock is 60 minutes old: a build of DeepSpeed's"
    ):
        refuse_stale_build_locks()
