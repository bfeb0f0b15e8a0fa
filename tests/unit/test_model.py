"""Attention against a naive reference, layer placement, parameter counts against hand and published figures."""

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from moe_train.config import MLAConfig, ModelConfig, MoEConfig, MTPConfig
from moe_train.model import Transformer, model_size
from moe_train.model.layers import Attention, LatentAttention, apply_rotary, rotary_tables
from moe_train.parallel.parallelize import apply_activation_checkpointing
from moe_train.tools.hydra_config import compose_config
from moe_train.tools.inspect import inspect_config


def naive_attention(attn: Attention, x, cos, sin):
    """Per head, explicit softmax(q k^T / sqrt(d)) with a causal mask; kv heads shared by groups."""
    B, T, _ = x.shape
    H, K, Dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = apply_rotary((x @ attn.wq.weight.T).view(B, T, H, Dh).transpose(1, 2), cos, sin)
    k = apply_rotary((x @ attn.wk.weight.T).view(B, T, K, Dh).transpose(1, 2), cos, sin)
    v = (x @ attn.wv.weight.T).view(B, T, K, Dh).transpose(1, 2)
    heads = []
    for h in range(H):
        kv = h // (H // K)
        scores = q[:, h] @ k[:, kv].transpose(-1, -2) / math.sqrt(Dh)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, kv])
    return torch.stack(heads, 1).transpose(1, 2).reshape(B, T, H * Dh) @ attn.wo.weight.T


@pytest.mark.parametrize("num_kv_heads", [8, 2, 1])
def test_grouped_query_attention_matches_naive(num_kv_heads):
    torch.manual_seed(0)
    attn = Attention(64, 8, num_kv_heads)
    cos, sin = rotary_tables(8, 32, 10000.0)
    x = torch.randn(2, 11, 64)
    torch.testing.assert_close(
        attn(x, cos[:11], sin[:11]), naive_attention(attn, x, cos[:11], sin[:11]), rtol=1e-5, atol=1e-5
    )


def naive_latent_attention(attn: LatentAttention, x, cos, sin):
    """MLA head by head from the weights: the query (through its latent when there is one), keys
    and values up from the normalised key/value latent, one rotary key shared by every head."""
    B, T, _ = x.shape
    nope, rope, dv, r = attn.nope_dim, attn.rope_dim, attn.v_dim, attn.kv_lora_rank

    def rms(z, weight):
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    if attn.q_lora:
        q_all = rms(x @ attn.wq_a.weight.T, attn.q_norm.weight) @ attn.wq_b.weight.T
    else:
        q_all = x @ attn.wq.weight.T
    a = x @ attn.wkv_a.weight.T
    latent, k_rope = rms(a[..., :r], attn.kv_norm.weight), a[..., r:]
    k_rope = apply_rotary(k_rope.unsqueeze(1), cos, sin)[:, 0]  # (B, T, rope): one for all heads
    up = latent @ attn.wkv_b.weight.T  # (B, T, H * (nope + dv))
    heads = []
    for h in range(attn.num_heads):
        q = q_all[..., h * (nope + rope) : (h + 1) * (nope + rope)]
        q = torch.cat([q[..., :nope], apply_rotary(q[..., nope:].unsqueeze(1), cos, sin)[:, 0]], -1)
        kv = up[..., h * (nope + dv) : (h + 1) * (nope + dv)]
        k, v = torch.cat([kv[..., :nope], k_rope], -1), kv[..., nope:]
        scores = q @ k.transpose(-1, -2) / math.sqrt(nope + rope)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        heads.append(scores.softmax(-1) @ v)
    return torch.cat(heads, -1) @ attn.wo.weight.T


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_latent_attention_matches_naive(q_lora_rank):
    torch.manual_seed(0)
    attn = LatentAttention(64, 4, kv_lora_rank=16, q_lora_rank=q_lora_rank, qk_nope_head_dim=12,
                           qk_rope_head_dim=8, v_head_dim=10)  # fmt: skip
    for norm in [attn.kv_norm] + ([attn.q_norm] if q_lora_rank else []):
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)  # norms not at their identity init
    cos, sin = rotary_tables(8, 32, 10000.0)
    x = torch.randn(2, 11, 64, requires_grad=True)
    out = attn(x, cos[:11], sin[:11])
    ref = naive_latent_attention(attn, x, cos[:11], sin[:11])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x, *attn.parameters()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *attn.parameters()])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_latent_attention_is_causal_and_position_relative():
    """A later token does not change an earlier one's output, and shifting the whole sequence's
    positions changes nothing (only the rotary parts see positions, and only relatively)."""
    torch.manual_seed(0)
    attn = LatentAttention(32, 2, 8, 0, 8, 8, 8)
    cos, sin = rotary_tables(8, 64, 10000.0)
    x = torch.randn(1, 9, 32)
    full = attn(x, cos[:9], sin[:9])
    torch.testing.assert_close(attn(x[:, :5], cos[:5], sin[:5]), full[:, :5])
    torch.testing.assert_close(attn(x, cos[20:29], sin[20:29]), full, rtol=1e-4, atol=1e-5)


def test_mla_model_counts_by_hand():
    """Parameters and FLOPs of a dense MLA model: the attention weights by hand, and the attention
    FLOPs with the query/key and value head sizes."""
    mla = MLAConfig(kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)
    config = ModelConfig(vocab_size=100, dim=64, num_layers=2, num_heads=4, ffn_hidden_dim=96, mla=mla)
    model = Transformer(config)
    attention = 64 * 24 + 24 + 24 * 4 * 20 + 64 * (16 + 8) + 16 + 16 * 4 * 22 + 4 * 10 * 64
    per_layer = attention + 3 * 64 * 96 + 2 * 64
    size = model_size(model, seq_len=32)
    assert size.total_params == 2 * per_layer + 2 * 100 * 64 + 64
    assert size.active_matmul_params == 2 * (per_layer - 24 - 16 - 2 * 64) + 100 * 64
    assert size.flops_per_token == 6 * size.active_matmul_params + 6 * 2 * 4 * (20 + 10) * 32
    assert model.rope_cos.shape == (config.max_seq_len, 8)


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from moe_train.config import RopeScalingConfig

    scaling = RopeScalingConfig(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_seq_len=64)  # fmt: skip
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    hf = LlamaRotaryEmbedding(LlamaConfig(hidden_size=512, num_attention_heads=4, rope_parameters=rope))
    cos, sin = hf(torch.zeros(1), torch.arange(1024)[None])
    ours = rotary_tables(128, 1024, 5e5, scaling)
    torch.testing.assert_close(ours, (cos[0], sin[0]), rtol=1e-5, atol=1e-5)
    plain = rotary_tables(128, 1024, 5e5)
    assert not torch.allclose(ours[0], plain[0])  # the scaling changes the long wavelengths


@pytest.mark.parametrize(
    "mscale,mscale_all_dim",
    [(0.0, 0.0), (0.707, 0.707), (1.0, 0.5)],
    ids=["yarn-temperature", "deepseek-v2", "ratio"],
)
def test_yarn_rope_scaling_matches_transformers(mscale, mscale_all_dim):
    """The frequencies, and the magnitude YaRN gives the tables: m(1) = 1 + 0.1 ln(factor) by
    default, m(mscale) / m(mscale_all_dim) with both (1 for DeepSeek's equal pair)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from moe_train.config import RopeScalingConfig

    scaling = RopeScalingConfig(type="yarn", factor=40.0, original_max_seq_len=64, beta_fast=32.0,
                                beta_slow=1.0, mscale=mscale, mscale_all_dim=mscale_all_dim)  # fmt: skip
    rope = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0, "original_max_position_embeddings": 64,
            "beta_fast": 32, "beta_slow": 1}  # fmt: skip
    if mscale:
        rope.update(mscale=mscale, mscale_all_dim=mscale_all_dim)
    hf = LlamaRotaryEmbedding(LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters=rope))
    cos, sin = hf(torch.zeros(1), torch.arange(2048)[None])
    ours = rotary_tables(64, 2048, 1e4, scaling)
    torch.testing.assert_close(ours, (cos[0], sin[0]), rtol=1e-5, atol=1e-5)
    m = {
        0.0: 1.0,
        0.5: 0.05 * math.log(40) + 1,
        0.707: 0.0707 * math.log(40) + 1,
        1.0: 0.1 * math.log(40) + 1,
    }
    expected = m[1.0] if not mscale else m[mscale] / m[mscale_all_dim]
    magnitude = (ours[0].square() + ours[1].square()).sqrt()
    torch.testing.assert_close(magnitude, torch.full_like(magnitude, expected))
    plain = rotary_tables(64, 2048, 1e4)
    torch.testing.assert_close(ours[0][:, 0] / expected, plain[0][:, 0])  # the fastest pair is kept
    assert not torch.allclose(ours[0][:, 31] / expected, plain[0][:, 31])  # the slowest is not


def test_rotary_preserves_norm_and_relative_position():
    cos, sin = rotary_tables(16, 64, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    rot = lambda x, p: apply_rotary(x, cos[p : p + 1], sin[p : p + 1])  # noqa: E731
    torch.testing.assert_close(rot(q, 5).norm(), q.norm())
    # q_m . k_n depends only on m - n
    torch.testing.assert_close((rot(q, 7) * rot(k, 3)).sum(), (rot(q, 24) * rot(k, 20)).sum())


def test_layer_placement_first_k_dense_and_every_n():
    config = ModelConfig(
        vocab_size=256, num_layers=6, moe=MoEConfig(num_experts=4, top_k=2, first_k_dense=1, every_n_layers=2)
    )
    assert Transformer(config).moe_layer_ids == [2, 4]
    assert Transformer(ModelConfig(vocab_size=256, num_layers=3)).moe_layer_ids == []


def test_forward_shapes_losses_and_tied_embeddings():
    config = ModelConfig(
        vocab_size=256,
        dim=32,
        num_heads=4,
        ffn_hidden_dim=64,
        max_seq_len=16,
        tie_embeddings=True,
        moe=MoEConfig(num_experts=4, top_k=2),
    )
    model = Transformer(config)
    out = model(torch.randint(0, 256, (3, 16)))
    assert out.logits.shape == (3, 16, 256)
    assert out.tokens_per_expert.shape == (4, 4) and out.tokens_per_expert.sum() == 4 * 3 * 16 * 2
    assert model.output.weight is model.tok_embeddings.weight
    dense = Transformer(ModelConfig(vocab_size=256, dim=32, num_heads=4, ffn_hidden_dim=64, max_seq_len=16))
    assert dense(torch.randint(0, 256, (1, 8))).aux_loss.item() == 0.0


# 2 layers, dim 8, vocab 10, 4 experts of hidden 6, top 2, 1 shared, GQA 2 heads / 1 kv head
HAND_COUNTED = ModelConfig(
    vocab_size=10,
    dim=8,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    ffn_hidden_dim=6,
    max_seq_len=4,
    moe=MoEConfig(num_experts=4, top_k=2, num_shared_experts=1),
)


def test_counts_by_hand():
    size = model_size(Transformer(HAND_COUNTED), seq_len=4)
    attention = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8  # wq, wk, wv, wo
    expert = 3 * 8 * 6
    per_layer = attention + 4 * expert + expert + 4 * 8 + 2 * 8  # routed, shared, router, 2 norms
    embeddings = 2 * 10 * 8
    assert size.total_params == 2 * per_layer + embeddings + 8
    active_layer = per_layer - 2 * expert
    assert size.active_params == 2 * active_layer + embeddings + 8
    matmul = 2 * (active_layer - 16) + 10 * 8
    assert size.active_matmul_params == matmul
    assert size.flops_per_token == 6 * matmul + 12 * 2 * 8 * 4


def test_counts_by_hand_with_multi_token_prediction():
    # the model above plus one MTP depth: two input norms, the [embedding; hidden] projection, one
    # more (MoE) block and its final norm; the output head runs once more per token
    without = model_size(Transformer(HAND_COUNTED), seq_len=4)
    size = model_size(Transformer(replace(HAND_COUNTED, mtp=MTPConfig(num_layers=1))), seq_len=4)
    attention = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8
    expert = 3 * 8 * 6
    block = attention + 4 * expert + expert + 4 * 8 + 2 * 8
    depth = 2 * 8 + 2 * 8 * 8 + block + 8
    assert size.mtp_params == depth
    assert size.total_params == without.total_params + depth
    assert size.active_params == without.active_params + depth - 2 * expert
    matmul = 2 * 8 * 8 + (block - 2 * expert - 16) + 10 * 8  # projection, block, head
    assert size.active_matmul_params == without.active_matmul_params + matmul
    assert size.flops_per_token == 6 * size.active_matmul_params + 12 * 3 * 8 * 4


# Published counts. A published figure is rounded: allow 1% or half a unit of its last digit.
PUBLISHED = {
    "mixtral_8x7b": (46.7e9, 0.05e9, 12.9e9, 0.05e9),
    "dbrx": (132e9, 0.5e9, 36e9, 0.5e9),
    "deepseekmoe_2b": (2.0e9, 0.05e9, 0.3e9, 0.05e9),
    "deepseekmoe_16b": (16.4e9, 0.05e9, 2.8e9, 0.05e9),
    "deepseekmoe_145b": (144.6e9, 0.05e9, 22.2e9, 0.05e9),
    "llama2_7b": (6.74e9, 0.005e9, 6.74e9, 0.005e9),
    "llama3_8b": (8.03e9, 0.005e9, 8.03e9, 0.005e9),
    "llama3_70b": (70.6e9, 0.05e9, 70.6e9, 0.05e9),
    "solar_10_7b": (10.7e9, 0.05e9, 10.7e9, 0.05e9),
    "grok1": (314e9, 0.5e9, None, None),
    "deepseek_v3": (671e9, 0.5e9, 37e9, 0.5e9),
    # 2.45B by our count: the paper gives it as 2.4B
    "deepseek_v2_lite": (15.7e9, 0.05e9, 2.4e9, 0.1e9),
}
# DeepSeek-V2 and V3 count active parameters without the input embedding (a lookup)
ACTIVE_WITHOUT_EMBEDDING = {"deepseek_v3", "deepseek_v2_lite"}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_full_size_presets_match_published_counts(preset):
    """Published counts are the main model's: without multi-token prediction modules."""
    config = compose_config([f"model={preset}"])
    counts = inspect_config(config)
    total, total_unit, active, active_unit = PUBLISHED[preset]
    main_total = counts["total_params"] - counts["mtp_params"]
    assert abs(main_total - total) <= max(0.01 * total, total_unit)
    if preset in ACTIVE_WITHOUT_EMBEDDING:
        counts["active_params"] -= config.model.vocab_size * config.model.dim
    if active is not None:
        main_active = counts["active_params"] - counts["mtp_active_params"]
        assert abs(main_active - active) <= max(0.01 * active, active_unit)


# The tiny presets bench.paper_claims compares (docs/paper_claims.md), matched to mixtral_tiny as
# DeepSeekMoE's Table 1 matches its models: which counts must agree, within 2 %.
MATCHED_TO_MIXTRAL_TINY = {
    "dbrx_tiny": ("total_params", "active_params", "flops_per_token"),
    "deepseekmoe_matched_tiny": ("total_params", "active_params", "flops_per_token"),
    "dense_tiny": ("active_params", "flops_per_token"),
}


@pytest.mark.parametrize("preset", sorted(MATCHED_TO_MIXTRAL_TINY))
def test_tiny_presets_compared_in_the_benchmark_are_matched(preset):
    reference = inspect_config(compose_config(["model=mixtral_tiny"]))
    counts = inspect_config(compose_config([f"model={preset}"]))
    for key in MATCHED_TO_MIXTRAL_TINY[preset]:
        assert abs(counts[key] / reference[key] - 1) <= 0.02, (key, counts[key], reference[key])


def test_deepseek_v3_with_its_mtp_module_has_the_published_checkpoints_size():
    """DeepSeek-V3's Hugging Face checkpoint holds 685B parameters, "671B of the main model and
    14B of the MTP module", which stores its own copies of the embedding and the output head. The
    685B is rounded and also counts the FP8 weights' 128 x 128 block scales (about 0.04B); the 14B
    is the difference of two rounded figures."""
    config = compose_config(["model=deepseek_v3"])
    counts = inspect_config(config)
    copies = 2 * config.model.vocab_size * config.model.dim
    assert config.model.mtp.num_layers == 1
    assert abs(counts["total_params"] + copies - 685e9) <= 0.5e9 + 0.05e9
    assert abs(counts["mtp_params"] + copies - 14e9) <= 1e9


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    config = ModelConfig(
        vocab_size=256,
        dim=32,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_dim=48,
        max_seq_len=16,
        moe=MoEConfig(num_experts=4, top_k=2, num_shared_experts=1),
    )
    torch.manual_seed(0)
    model = Transformer(config)
    recomputing = copy.deepcopy(model)
    apply_activation_checkpointing(recomputing)
    tokens = torch.randint(0, 256, (2, 16))

    def loss_and_grads(model):
        out = model(tokens)
        loss = out.logits.logsumexp(-1).mean() + out.aux_loss + out.z_loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads(model)
    loss_ckpt, grads_ckpt = loss_and_grads(recomputing)
    assert recomputing.state_dict().keys() == model.state_dict().keys()
    assert torch.equal(loss, loss_ckpt)
    for g, g_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(g_ckpt, g)


def mtp_reference_loss(model: Transformer, sequence: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's multi-token prediction written out position by position, each from its own
    prefix only: depth k at position i combines depth k-1's hidden state at i (the main model's
    normalised output for k = 1) with the embedding of token i + k and predicts token i + k + 1.
    sequence (B, T + 1): the model's input is its first T tokens."""
    T = sequence.shape[1] - 1
    per_depth = []
    for k in range(1, len(model.mtp) + 1):
        losses = []
        for i in range(T - k):
            n = i + 1  # positions 0..i
            cos, sin = model.rope_cos[:n], model.rope_sin[:n]
            x = model.tok_embeddings(sequence[:, :n])
            for block in model.layers.values():
                x, _ = block(x, cos, sin)
            hidden = model.norm(x)
            for d in range(1, k + 1):
                depth = model.mtp[d - 1]
                ahead = model.tok_embeddings(sequence[:, d : d + n])  # token j + d at position j
                x = depth.eh_proj(torch.cat([depth.enorm(ahead), depth.hnorm(hidden)], dim=-1))
                x, _ = depth.block(x, cos, sin)
                hidden = depth.norm(x)
            logits = model.output(hidden[:, i])
            losses.append(F.cross_entropy(logits, sequence[:, i + k + 1], reduction="none"))
        per_depth.append(torch.cat(losses).mean())
    return torch.stack(per_depth).mean()


@pytest.mark.parametrize("mla", [False, True], ids=["gqa", "mla"])
def test_multi_token_prediction_matches_a_position_by_position_reference(mla):
    config = ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_dim=48,
        max_seq_len=16,
        moe=MoEConfig(num_experts=4, top_k=2, num_shared_experts=1, first_k_dense=1),
        mla=MLAConfig(kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
        if mla
        else MLAConfig(),
        mtp=MTPConfig(num_layers=2),
    )
    torch.manual_seed(0)
    model = Transformer(config)
    sequence = torch.randint(0, 64, (2, 11))
    out = model(sequence[:, :-1], targets=sequence[:, 1:])
    torch.testing.assert_close(out.mtp_loss, mtp_reference_loss(model, sequence))
    # the depths' MoE blocks report their routing after the layers' (layer ids 2 and 3)
    assert model.moe_layer_ids == [1, 2, 3]
    assert out.tokens_per_expert.shape == (3, 4)
    assert out.tokens_per_expert[1].sum() == 2 * 9 * 2  # depth 1: 9 positions, top-2
    assert out.tokens_per_expert[2].sum() == 2 * 8 * 2


def test_multi_token_prediction_trains_the_main_model_and_leaves_its_logits_alone():
    config = ModelConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, ffn_hidden_dim=48, max_seq_len=16)
    torch.manual_seed(0)
    plain = Transformer(config)
    with_mtp = Transformer(replace(config, mtp=MTPConfig(num_layers=1)))
    missing, _ = with_mtp.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(key.startswith("mtp.0.") for key in missing)
    sequence = torch.randint(0, 64, (2, 11))
    out = with_mtp(sequence[:, :-1], targets=sequence[:, 1:])
    assert torch.equal(out.logits, plain(sequence[:, :-1]).logits)
    # without targets (evaluation, generation) the depths do not run
    assert with_mtp(sequence[:, :-1]).mtp_loss.item() == 0
    out.mtp_loss.backward()
    for name, p in with_mtp.named_parameters():  # DeepSeek-V3: MTP's gradient reaches the main model
        assert p.grad is not None and p.grad.abs().sum() > 0, name
