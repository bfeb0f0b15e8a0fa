"""Pipeline parallelism's pure parts: the stage split, which rank runs which stage, what each
stage keeps of the model, and the one-line refusals of layouts that cannot run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_train.config import ConfigError, ParallelConfig
from moe_train.model import Transformer
from moe_train.parallel.pipeline import check_micro_batches, prune_to_stages, split_layers
from moe_train.parallel.topology import check_layout, stage_ids
from moe_train.tools.hydra_config import compose_config
from tests.conftest import TINY


def test_layers_split_evenly_with_the_remainder_in_the_middle():
    assert split_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    # DeepSeek-V3's 61 layers over 16 stages: 13 middle stages of 4, the rest (the ends) of 3
    sizes = [len(r) for r in split_layers(61, 16)]
    assert sizes == [3] + [4] * 13 + [3, 3]
    assert [len(r) for r in split_layers(5, 2)] == [3, 2]  # the first before the last (the head)
    assert split_layers(6, 3, [1, 3, 2]) == [range(0, 1), range(1, 4), range(4, 6)]


def test_stages_are_looped_over_the_ranks_or_placed_in_a_v():
    assert [stage_ids(r, 4, 1, "1F1B") for r in range(4)] == [[0], [1], [2], [3]]
    assert [stage_ids(r, 2, 2, "Interleaved1F1B") for r in range(2)] == [[0, 2], [1, 3]]
    assert [stage_ids(r, 2, 2, "ZBVZeroBubble") for r in range(2)] == [[0, 3], [1, 2]]


def model(*overrides: str) -> Transformer:
    config = compose_config([*TINY, "model.num_layers=4", *overrides]).model
    with torch.device("meta"):
        return Transformer(dataclasses.replace(config, vocab_size=256))


def test_each_stage_keeps_its_layers_and_the_names_they_had():
    first, last = model(), model("model.mtp.num_layers=1")
    layers = split_layers(4, 2)
    prune_to_stages(first, [0], 2, layers)
    prune_to_stages(last, [1], 2, layers)
    assert {k.split(".")[0] for k in first.state_dict()} == {"tok_embeddings", "layers"}
    assert sorted({".".join(k.split(".")[:2]) for k in first.state_dict() if k.startswith("layers")}) == [
        "layers.0",
        "layers.1",
    ]
    # the last stage: its layers, the head, the MTP depth and the embedding that depth needs
    assert {k.split(".")[0] for k in last.state_dict()} == {
        "tok_embeddings",
        "layers",
        "norm",
        "output",
        "mtp",
    }
    assert last.moe_layer_ids == [2, 3, 4]
    without_mtp = model()
    prune_to_stages(without_mtp, [1], 2, layers)
    assert without_mtp.tok_embeddings is None  # no copy where nothing on the last stage embeds
    v = model()  # rank 0 of a V holds the first and the last stage
    prune_to_stages(v, [0, 3], 4, split_layers(4, 4))
    assert sorted(v.layers.keys()) == ["0", "3"] and v.output is not None


@pytest.mark.parametrize(
    "schedule,pp,micro_batches,message",
    [
        ("1F1B", 4, 2, "parallel.pp_schedule=1F1B at parallel.pp=4 needs at least 4 micro-batches per step"),
        ("DualPipeV", 2, 3, "parallel.pp_schedule=DualPipeV at parallel.pp=2 needs at least 4 micro-batches"),
        ("Interleaved1F1B", 2, 5, r"needs the micro-batches per step \(5\) to be a multiple of 2"),
    ],
)
def test_a_schedule_short_of_micro_batches_is_refused(schedule, pp, micro_batches, message):
    with pytest.raises(ConfigError, match=message):
        check_micro_batches(ParallelConfig(pp=pp, pp_schedule=schedule), micro_batches)
    check_micro_batches(ParallelConfig(pp=pp, pp_schedule="GPipe"), 1)  # GPipe runs any number
    for other in ("LoopedBFS", "ZBVZeroBubble", "DualPipeV"):  # no rounds: 5 at pp=2 runs (torch's rule)
        check_micro_batches(ParallelConfig(pp=2, pp_schedule=other), 5)


def test_pp_must_divide_the_world_and_ep_a_stage():
    with pytest.raises(
        ConfigError, match=r"^parallel.pp=4 must divide the world size 6 .* allowed pp values: 1, 2, 3, 6$"
    ):
        check_layout(ParallelConfig(pp=4), 6)
    with pytest.raises(ConfigError, match=r"^parallel.ep=4 must divide the 2 ranks of a pipeline stage"):
        check_layout(ParallelConfig(pp=2, ep=4), 4)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["parallel.pp=8"],
            r"parallel.pp=8 x parallel.pp_stages_per_rank=1 = 8 stages is more than model.num_layers=4",
        ),
        (
            ["parallel.pp=2", "parallel.pp_layers=[1,2]"],
            r"parallel.pp_layers=\[1, 2\] must list 2 stages .* summing to model.num_layers=4",
        ),
        (
            ["parallel.pp=2", "parallel.pp_layers=[4,0]"],
            r"parallel.pp_layers=\[4, 0\]: every stage needs at least one layer",
        ),
        (
            ["parallel.pp=2", "parallel.pp_schedule=ZeroBubble"],
            r"parallel.pp_schedule='ZeroBubble' is not allowed; choose one of GPipe, 1F1B",
        ),
        (
            ["parallel.pp=2", "parallel.pp_schedule=1F1B", "parallel.pp_stages_per_rank=2"],
            r"runs one stage per rank",
        ),
        (
            ["parallel.pp=2", "parallel.pp_schedule=DualPipeV", "parallel.pp_stages_per_rank=1"],
            r"needs exactly 2 stages per rank",
        ),
        (["parallel.pp=2", "engine=deepspeed"], r"parallel.pp=2 needs engine=native"),
        (
            ["parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble", "trainer.compile=true"],
            r"trainer.compile=true cannot run with parallel.pp_schedule=ZBVZeroBubble",
        ),
    ],
)
def test_pipeline_settings_that_cannot_run_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as refused:
        compose_config([*TINY, "model.num_layers=4", *overrides])
    assert "\n" not in str(refused.value)
