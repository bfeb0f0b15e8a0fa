"""torch.compile of whole blocks: every kind of MoE block traces as one graph (fullgraph=True, so
no graph break and no host read of a data-dependent value) and computes what eager computes.

Most cases compile with the aot_eager backend: the same Dynamo capture and AOT autograd graphs as
inductor, without generating C++ (seconds instead of minutes on 2 cores). One run goes through
inductor end to end, as `trainer.compile=true` does."""

import functools

import pytest
import torch

from moe_train.config import MLAConfig, ModelConfig, MoEConfig
from moe_train.model.transformer import Block, Transformer
from tests.conftest import TINY, losses, train

DIM = 32


def block_of(kind: dict) -> tuple[Block, Transformer]:
    """An MoE block (layer 1 of 2) of a tiny model of these settings, weights from init_weights."""
    moe = {"num_experts": 8, "top_k": 2, "expert_hidden_dim": 16, **kind.pop("moe", {})}
    config = ModelConfig(
        vocab_size=64,
        dim=DIM,
        num_layers=2,
        num_heads=4,
        num_kv_heads=kind.pop("num_kv_heads", 2),
        ffn_hidden_dim=48,
        max_seq_len=64,
        moe=MoEConfig(first_k_dense=1, **moe),
        **kind,
    )
    model = Transformer(config)
    model.init_weights(seed=0)
    block = model.layers["1"]
    assert block.is_moe
    return block, model


KINDS = {
    "dropless softmax top-2, GQA": {},
    "capacity factor that drops": {"moe": {"capacity_factor": 0.5}},
    "fine-grained top-4 and shared experts": {
        "moe": {"num_experts": 16, "top_k": 4, "num_shared_experts": 2, "expert_hidden_dim": 8}
    },
    "sigmoid in groups, routing bias, MLA": {
        "moe": {
            "num_experts": 16,
            "top_k": 4,
            "score_function": "sigmoid",
            "num_expert_groups": 4,
            "topk_groups": 2,
            "routed_scaling_factor": 2.5,
            "bias_update_rate": 0.001,
            "aux_loss_scope": "sequence",
        },
        "num_kv_heads": 4,
        "mla": MLAConfig(
            kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8
        ),
    },
}


def run_block(forward, block: Block, model: Transformer, x: torch.Tensor):
    """Output, stats and the gradients of x and of every parameter, from one forward and backward."""
    T = x.shape[1]
    x = x.clone().requires_grad_()
    out, stats = forward(x, model.rope_cos[:T], model.rope_sin[:T])
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + stats.aux_loss + stats.z_loss
    params = [p for p in block.parameters()]
    grads = torch.autograd.grad(loss, [x, *params])
    return out, stats, grads


@pytest.mark.parametrize("kind", KINDS, ids=list(KINDS))
def test_each_kind_of_moe_block_compiles_whole_and_matches_eager(kind):
    block, model = block_of(dict(KINDS[kind]))
    if block.ffn.router.expert_bias is not None:
        block.ffn.router.expert_bias.copy_(torch.linspace(-0.1, 0.1, block.ffn.num_experts))
    x = torch.randn(2, 24, DIM, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(block.forward, fullgraph=True, backend="aot_eager")
    out, stats, grads = run_block(compiled, block, model, x)
    out_ref, stats_ref, grads_ref = run_block(block.forward, block, model, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for name in ("aux_loss", "device_aux_loss", "z_loss"):
        torch.testing.assert_close(getattr(stats, name), getattr(stats_ref, name), rtol=1e-5, atol=1e-5)
    assert torch.equal(stats.tokens_per_expert, stats_ref.tokens_per_expert)
    assert torch.equal(stats.dropped, stats_ref.dropped)
    assert (stats.dropped > 0) == ("drops" in kind)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


PRESETS = {
    "mixtral_tiny": [],
    "deepseekmoe_tiny": [],
    "deepseek_v3_tiny": ["model.mtp.num_layers=1"],
}


def preset_run(tmp_path, preset: str, extra: list[str], compile: bool) -> list[dict]:
    shrink = [o for o in TINY if not o.startswith(("model", "trainer.eval_batches"))]
    return train(
        [
            *shrink,
            f"model={preset}",
            "model.num_layers=2",
            *extra,
            "trainer.max_steps=5",
            "trainer.eval_batches=1",
            "trainer.num_samples=0",
            f"trainer.compile={str(compile).lower()}",
            f"trainer.out_dir={tmp_path / ('compiled' if compile else 'eager')}",
        ]
    )


@pytest.mark.parametrize("preset", PRESETS)
def test_compiled_training_steps_match_eager(tmp_path, monkeypatch, preset):
    """Five steps of each preset's blocks compiled whole (a graph break would raise: fullgraph)
    give eager's losses and gradient norms, the MoE terms and the routing bias included."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = preset_run(tmp_path, preset, PRESETS[preset], compile=True)
    eager = preset_run(tmp_path, preset, PRESETS[preset], compile=False)
    assert len(compiled) == 5
    for got, want in zip(losses(compiled), losses(eager)):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_inductor_compiled_training_matches_eager(tmp_path):
    """The real thing: trainer.compile=true through inductor's generated code, then evaluation."""
    torch._dynamo.reset()
    compiled = preset_run(tmp_path, "mixtral_tiny", [], compile=True)
    eager = preset_run(tmp_path, "mixtral_tiny", [], compile=False)
    for got, want in zip(losses(compiled), losses(eager)):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    val = [m["val_loss"] for m in compiled if "val_loss" in m]
    val_ref = [m["val_loss"] for m in eager if "val_loss" in m]
    assert val and val == pytest.approx(val_ref, rel=1e-5)
