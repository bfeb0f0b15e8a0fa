"""tools.plan: the published presets fit where the plan says, its dry run holds the bytes it
counts, and a layout that cannot be is one line (its counts at tiny scale are checked against
the tensors training holds in tests/distributed/test_expert_parallel.py)."""

import math
import subprocess
import sys

import pytest

from moe_train.tools.hydra_config import compose_config
from moe_train.tools.memory import GIB, Layout, ModelShapes, native_bytes
from moe_train.tools.plan import dry_run, fewest_gpus

FULL_SIZE = ["data.seq_len=4096", "trainer.micro_batch_size=1", "trainer.activation_checkpointing=true"]


@pytest.mark.parametrize(
    "preset,most_gpus",
    [
        ("mixtral_8x7b", 16),
        ("dbrx", 64),
        ("deepseekmoe_145b", 64),
        ("grok1", 128),
        ("deepseek_v3", 256),
        ("llama3_70b", 32),
    ],
)
def test_the_published_presets_fit_in_80_gb(preset, most_gpus):
    shapes = ModelShapes(compose_config([f"model={preset}", *FULL_SIZE]))
    layout, counted = fewest_gpus(shapes, "native", bf16=True, memory=80 * 10**9, max_gpus=4096)
    assert layout.gpus <= most_gpus and counted.total <= 80 * 10**9


def test_a_dry_run_of_deepseek_v3_on_256_gpus_holds_what_the_plan_counts():
    """Rank 0's real shards (FSDP2 over a fake world of 256), and Adam's state made by a step."""
    config = compose_config(["model=deepseek_v3", "parallel.ep=64", *FULL_SIZE])
    layout = Layout(256, 64, 256)
    dry = dry_run(config, layout, bf16=True)
    counted = native_bytes(ModelShapes(config), layout, bf16=True)
    assert (dry["weights"], dry["gradients"], dry["optimizer"]) == (
        counted.weights,
        counted.gradients,
        counted.optimizer,
    )
    whole_model = 4 * 682.6e9
    assert dry["startup_host_memory"] < whole_model / 150  # its shards and one tensor, not the model
    assert dry["startup_host_memory"] < 16 * GIB


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--gpus", "6", "parallel.ep=4"],
            "parallel.ep=4 must divide model.moe.num_experts=8 and the 6 GPUs",
        ),
        (["--gpus", "8", "parallel.dp_shard=3"], "parallel.dp_shard=3 must divide the 8 GPUs (1, 2, 4, 8)"),
        (
            ["--gpus", "4", "--gpu-memory-gb", "1", "--max-gpus", "64"],
            "no layout of up to 64 GPUs fits; the smallest memory that fits is",
        ),
        (["--gpus", "0"], "--gpus=0 and --max-gpus=4096 must be >= 1"),
        (["--gpus", "8", "--gpu-memory-gb", "nan"], "--gpu-memory-gb=nan must be a finite number > 0"),
    ],
)
def test_a_layout_that_cannot_be_is_one_line(args, message):
    result = subprocess.run(
        [sys.executable, "-m", "moe_train.tools.plan", "model=mixtral_8x7b", *args],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_rank_starts_with_its_shards_and_one_tensor_at_a_time(monkeypatch):
    """Rank 0 of 4 (ep=2, a fake world): materialising allocates only its shards, and what it
    draws to initialise them is one tensor at a time, one expert of a stacked tensor."""
    import torch

    import moe_train.model.transformer as transformer
    from moe_train.model import Transformer
    from moe_train.parallel.parallelize import materialize, parallelize
    from moe_train.parallel.topology import Topology
    from moe_train.tools.plan import fake_world
    from moe_train.train.engine import tensor_bytes

    config = compose_config(["model=mixtral_tiny", "model.vocab_size=512", "parallel.ep=2"])
    drawn = []
    normal = transformer._normal
    monkeypatch.setattr(
        transformer, "_normal", lambda shape, *a: drawn.append(math.prod(shape)) or normal(shape, *a)
    )
    with fake_world(4):
        topology = Topology.setup(config.parallel, "cpu")
        with torch.device("meta"):
            model = Transformer(config.model)
        parallelize(model, config, topology, bf16=False)
        materialize(model, seed=0, topology=topology)
        held = tensor_bytes(model.parameters())
    drawn = list(drawn)
    whole = Transformer(config.model)  # one process: every parameter whole
    assert held == native_bytes(ModelShapes(config), Layout(4, 2, 4), bf16=False).weights
    assert held < tensor_bytes(whole.parameters()) / 3
    experts = whole.layers["0"].ffn.experts.w13  # (8, 192, 768): one expert outweighs any dense tensor
    largest_dense = max(p.numel() for n, p in whole.named_parameters() if "experts" not in n)
    assert max(drawn) == max(largest_dense, experts[0].numel()) < experts.numel()
