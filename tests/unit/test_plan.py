"""tools.plan: the published presets fit where the plan says, its dry run holds the bytes it
counts, and a layout that cannot be is one line (its counts at tiny scale are checked against
the tensors training holds in tests/distributed/test_expert_parallel.py)."""

import math
import subprocess
import sys

import pytest

from moe_train.tools.hydra_config import compose_config
from moe_train.tools.memory import GIB, Layout, ModelShapes, block_activations, native_bytes, native_ranks
from moe_train.tools.plan import dry_run, fewest_gpus, layouts, main

FULL_SIZE = [
    "data.seq_len=4096",
    "trainer.micro_batch_size=1",
    "trainer.activation_checkpointing=true",
    "trainer.global_batch_size=1024",  # it must split over the GPUs: a layout that cannot is not taken
]


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


def test_a_pipeline_rank_holds_its_stage_as_counted_by_hand():
    """dense_tiny (D 192, 6 heads of 32, 2 KV heads, FFN 768, V 512, 4 layers) at pp=2 on 4 GPUs
    (2 per stage, fully sharded), 1F1B, fp32: the last stage is layers 2 and 3, the norm and the head."""
    config = compose_config(
        ["model=dense_tiny", "model.vocab_size=512", "trainer.precision=fp32", "data.seq_len=64"]
        + [
            "trainer.micro_batch_size=1",
            "trainer.global_batch_size=8",
            "trainer.activation_checkpointing=true",
        ]
    )
    D, kv, F, V = 192, 2 * 32, 768, 512
    layer = 2 * D * D + 2 * kv * D + 2 * D + 3 * F * D  # wq wo, wk wv, two norms, w1 w3 w2
    last = 2 * layer + D + V * D  # every dim 0 is even: each of 2 GPUs holds half
    ranks = native_ranks(ModelShapes(config), Layout(gpus=4, ep=1, dp_shard=2, pp=2), bf16=False)
    assert (ranks[1].weights, ranks[1].gradients, ranks[1].optimizer) == (2 * last, 2 * last, 4 * last)
    first = V * D + 2 * layer
    assert ranks[0].weights == 2 * first
    # the stage held gathered (fp32) with its whole fp32 gradient, and a receive buffer (fp32) per
    # micro-batch: m = 8 sequences / 2 data-parallel ranks = 4, the last stage receives activations
    tokens, m = 64, 4
    assert ranks[1].buffers == last * (4 + 4) + m * tokens * D * 4
    # 1F1B, activation checkpointing: the first stage keeps min(m, pp) = 2 micro-batches of its two
    # blocks' inputs, the last 1 with its logits (fp32, their fp32 copy and gradient); each one
    # block's working set
    _, working, _ = block_activations(config, 4)
    assert ranks[0].activations == 2 * 2 * tokens * D * 4 + max(working[:2])
    assert ranks[1].activations == 2 * tokens * D * 4 + tokens * V * (4 + 8) + max(working[2:])


def test_a_dry_run_with_pipeline_stages_holds_what_the_plan_counts():
    """The last pipeline rank of deepseek_v3_tiny with multi-token prediction (it holds a copy of
    the embedding, the largest tensor) at pp=2 x ep=2 on 8 fake GPUs: its shards equal the count."""
    config = compose_config(
        ["model=deepseek_v3_tiny", "model.vocab_size=4096", "model.mtp.num_layers=1", "parallel.ep=2"]
    )
    layout = Layout(gpus=8, ep=2, dp_shard=2, pp=2)
    dry = dry_run(config, layout, bf16=True, pp_rank=1)
    counted = native_ranks(ModelShapes(config), layout, bf16=True)[1]
    assert dry["rank"] == 4 and next(iter(dry["largest_tensors"])) == "tok_embeddings.weight"
    assert (dry["weights"], dry["optimizer"]) == (counted.weights, counted.optimizer)


def test_the_search_takes_pipeline_stages_where_they_are_needed():
    """A 32k vocabulary on a tiny model, fp32: without pp, FSDP gathers the head (V x D) whole and
    each GPU holds half of both ends; at pp=2 on 2 GPUs each holds one end, nothing gathered."""
    config = compose_config(
        ["model=dense_tiny", "model.vocab_size=32768", "trainer.precision=fp32", "data.seq_len=64"]
        + ["trainer.micro_batch_size=1", "trainer.global_batch_size=8"]
    )
    shapes, memory = ModelShapes(config), 150_000_000
    without_pp = [layout for g in (1, 2) for layout in layouts(g, config, "native") if layout.pp == 1]
    assert all(native_bytes(shapes, layout, bf16=False).total > memory for layout in without_pp)
    layout, counted = fewest_gpus(shapes, "native", bf16=False, memory=memory, max_gpus=64)
    assert layout == Layout(gpus=2, ep=1, dp_shard=1, pp=2) and counted.total <= memory


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpus", "12", "parallel.pp=8"], "parallel.pp=8 must divide the 12 GPUs (1, 2, 3, 4, 6, 12)"),
        (["--gpus", "64", "parallel.pp=64"], "stages is more than model.num_layers=32"),
        (
            ["--gpus", "16", "parallel.pp=4", "parallel.ep=8"],
            "parallel.ep=8 must divide model.moe.num_experts=8 and the 4 GPUs of a pipeline stage (1, 2, 4)",
        ),
        (["--gpus", "16", "parallel.pp=4"], "needs at least 4 micro-batches per step"),
    ],
)
def test_a_pipeline_layout_that_cannot_be_is_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["model=mixtral_8x7b", *args])
    stderr = capsys.readouterr().err
    assert exit.value.code == 2
    assert stderr.startswith("error: ") and message in stderr and stderr.count("\n") == 1
