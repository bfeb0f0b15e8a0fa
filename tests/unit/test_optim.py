"""The learning-rate schedules against hand-computed values, and the weight-decay groups."""

import math

import pytest

from moe_train.config import ModelConfig, MoEConfig, OptimConfig
from moe_train.model.transformer import Transformer
from moe_train.train.optim import lr_at, param_groups


def schedule(name, **kwargs):
    return OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=2, schedule=name, **kwargs)


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd"])
def test_warmup_is_linear_from_zero(name):
    assert [lr_at(s, schedule(name), 12) for s in (0, 1)] == [0.5, 1.0]


def test_cosine_and_linear_by_hand():
    # 12 steps, 2 of warmup: the decay runs over steps 2..12, so step 4 is 20 % into it
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(0.2 * math.pi))
    assert lr_at(4, schedule("cosine"), 12) == pytest.approx(cosine)
    assert lr_at(4, schedule("linear"), 12) == pytest.approx(0.1 + 0.9 * 0.8)
    for name in ("cosine", "linear"):
        assert lr_at(2, schedule(name), 12) == 1.0
        assert lr_at(7, schedule(name), 12) == pytest.approx(0.55)  # half way
        assert lr_at(12, schedule(name), 12) == pytest.approx(0.1)


def test_wsd_holds_then_decays_over_the_last_fraction_by_hand():
    config = schedule("wsd", decay_fraction=0.2)  # 20 steps: the decay runs over steps 16..20
    assert [lr_at(s, config, 20) for s in range(2, 17)] == [1.0] * 15
    assert [lr_at(s, config, 20) for s in (17, 18, 19, 20)] == pytest.approx([0.775, 0.55, 0.325, 0.1])


def test_wsd_before_its_decay_does_not_depend_on_max_steps():
    config = schedule("wsd", decay_fraction=0.25)
    assert all(lr_at(s, config, 8) == lr_at(s, config, 400) for s in range(7))  # decay from 6 of 8
    assert lr_at(7, config, 8) < lr_at(7, config, 400)
    assert lr_at(5, schedule("cosine"), 8) != lr_at(5, schedule("cosine"), 400)


def test_wsd_edge_fractions():
    assert [lr_at(s, schedule("wsd", decay_fraction=0.0), 10) for s in range(2, 10)] == [1.0] * 8  # constant
    whole = schedule("wsd", decay_fraction=1.0)  # decays from the end of the warmup, as linear does
    assert all(lr_at(s, whole, 10) == lr_at(s, schedule("linear"), 10) for s in range(10))
    # a decay longer than what the warmup leaves starts where the warmup ends
    late = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=8, schedule="wsd", decay_fraction=0.5)
    assert [lr_at(s, late, 10) for s in (7, 8, 9)] == pytest.approx([1.0, 1.0, 0.5])


def test_weight_decay_only_on_matrices_that_are_not_embeddings():
    model = Transformer(
        ModelConfig(
            vocab_size=64,
            dim=32,
            num_layers=1,
            num_heads=4,
            ffn_hidden_dim=64,
            moe=MoEConfig(num_experts=4, top_k=2),
        )
    )
    decay, no_decay = (group for group in param_groups(model, OptimConfig()))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert not any("tok_embeddings" in n or "norm" in n for n in decayed)
    assert any("experts.w13" in n for n in decayed) and any("router.gate" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
