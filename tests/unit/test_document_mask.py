"""Packed documents kept apart (data.document_mask, data.reset_positions, data.eod_mask_loss): each
document of a packed sequence gets the logits it gets alone, with GQA, MLA and multi-token
prediction, through SDPA and FlexAttention; with every option off the output is bit-identical;
activation checkpointing, compile, generation and resume see the same masks."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from moe_train.config import MLAConfig, ModelConfig, MoEConfig, MTPConfig
from moe_train.model import Transformer, lm_loss
from moe_train.model.documents import DocumentPacking
from moe_train.model.generate import generate
from moe_train.parallel.parallelize import apply_activation_checkpointing
from tests.conftest import losses, train

EOS = 0
LENGTHS = (7, 12, 5, 8)  # documents of one packed row, each ending with EOS: 32 tokens


def gqa_config() -> ModelConfig:  # mixtral_tiny's recipe, smaller
    return ModelConfig(
        vocab_size=64, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_dim=96, max_seq_len=64,
        moe=MoEConfig(num_experts=4, top_k=2),
    )  # fmt: skip


def mla_config() -> ModelConfig:  # deepseek_v3_tiny's recipe, smaller
    moe = MoEConfig(
        num_experts=8, top_k=2, num_shared_experts=1, expert_hidden_dim=32, first_k_dense=1,
        score_function="sigmoid", num_expert_groups=4, topk_groups=2, bias_update_rate=0.001,
    )  # fmt: skip
    mla = MLAConfig(kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    return ModelConfig(
        vocab_size=64, dim=64, num_layers=2, num_heads=4, num_kv_heads=4, ffn_hidden_dim=96, max_seq_len=64,
        moe=moe, mla=mla,
    )  # fmt: skip


def model_of(name: str) -> Transformer:
    config = gqa_config() if name.startswith("gqa") else mla_config()
    if name.endswith("mtp"):
        config = dataclasses.replace(config, mtp=MTPConfig(num_layers=2))
    return Transformer(config)  # initialised from seed 0


def packed_row(seed: int) -> tuple[torch.Tensor, list[slice]]:
    """One row of documents packed end to end (each ends with EOS) and one more target token;
    where each document lies."""
    g = torch.Generator().manual_seed(seed)
    parts, spans, start = [], [], 0
    for n in LENGTHS:
        parts += [torch.randint(1, 64, (n - 1,), generator=g), torch.tensor([EOS])]
        spans.append(slice(start, start + n))
        start += n
    return torch.cat([*parts, torch.randint(1, 64, (1,), generator=g)]), spans


def batch() -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    """inputs, targets (2, 32): two rows of packed documents; the spans of the first row's."""
    (row0, spans), (row1, _) = packed_row(1), packed_row(2)
    window = torch.stack([row0, row1])  # (2, T + 1)
    return window[:, :-1], window[:, 1:], spans


def output_logits(model: Transformer, *args) -> list[torch.Tensor]:
    """The model's logits, then each multi-token prediction depth's (the shared output head's calls)."""
    seen = []
    handle = model.output.register_forward_hook(lambda module, inputs, out: seen.append(out))
    with torch.no_grad():
        model(*args)
    handle.remove()
    return seen


def assert_documents_alone(packed: list[torch.Tensor], model, inputs, targets, spans) -> None:
    for span in spans:
        alone = output_logits(model, inputs[:1, span], targets[:1, span])
        assert len(alone) == len(packed) == 1 + model.config.mtp.num_layers
        for k, (p, a) in enumerate(zip(packed, alone)):  # depth k runs on the first n - k positions
            n = span.stop - span.start - k
            torch.testing.assert_close(p[:1, span.start : span.start + n], a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("reset_positions", [True, False], ids=["positions-reset", "positions-packed"])
@pytest.mark.parametrize("name", ["gqa", "mla", "gqa_mtp", "mla_mtp"])
def test_each_document_gets_the_logits_it_gets_alone(name, reset_positions):
    """Rotary attention depends on distances only: without reset positions the logits move by
    rounding (2e-7 here), not more."""
    model = model_of(name).eval()
    inputs, targets, spans = batch()
    packing = DocumentPacking(EOS, reset_positions=reset_positions)
    packed = output_logits(model, inputs, targets, packing(inputs, targets))
    assert_documents_alone(packed, model, inputs, targets, spans)
    if reset_positions:  # without the mask, the documents after the first see the ones before
        unmasked = output_logits(model, inputs, targets)[0]
        assert (unmasked[:1, spans[1]] - packed[0][:1, spans[1]]).abs().max() > 1e-3


def test_flex_attention_block_mask_gives_the_boolean_masks_logits():
    """The GPU's kernel, forward and eager on the CPU (no CPU backward in torch): its block masks,
    the MTP depths' shorter one included, keep the documents apart alike."""
    model = model_of("gqa_mtp").eval()
    inputs, targets, spans = batch()
    flex = DocumentPacking(EOS, reset_positions=True, kernel="flex")(inputs, targets)
    packed = output_logits(model, inputs, targets, flex)
    sdpa = output_logits(model, inputs, targets, DocumentPacking(EOS, reset_positions=True)(inputs, targets))
    for f, s in zip(packed, sdpa):
        torch.testing.assert_close(f, s, rtol=0, atol=1e-5)
    assert_documents_alone(packed, model, inputs, targets, spans[:2])


@pytest.mark.parametrize("name", ["gqa_mtp", "mla_mtp"])
def test_every_option_off_is_bit_identical(name):
    model = model_of(name)
    inputs, targets, _ = batch()
    documents = DocumentPacking(EOS, attention=False)(inputs, targets)
    plain, off = model(inputs, targets), model(inputs, targets, documents)
    assert torch.equal(plain.logits, off.logits) and torch.equal(plain.mtp_loss, off.mtp_loss)
    assert torch.equal(lm_loss(plain.logits, targets), lm_loss(off.logits, targets, documents.loss_mask()))


def test_documents_positions_and_loss_masks_from_the_end_tokens():
    tokens = torch.tensor([[5, EOS, 7, 8, EOS, EOS, 9, 4]])
    targets = torch.tensor([[EOS, 7, 8, EOS, EOS, 9, 4, 2]])
    docs = DocumentPacking(EOS, reset_positions=True, mask_loss=True)(tokens, targets)
    assert docs.ids.tolist() == [[0, 0, 1, 1, 1, 2, 3, 3]]  # a marker ends its own document
    assert docs.positions.tolist() == [[0, 1, 0, 1, 2, 0, 0, 1]]
    # the prediction made at a marker is of the next document's first token
    assert docs.loss_mask().tolist() == [[True, False, True, True, False, False, True, True]]
    # MTP depth 1 at i predicts token i + 2: it counts where no marker lies in tokens i, i + 1
    assert docs.loss_mask(1).tolist() == [[False, False, True, False, False, False, True]]
    mask = docs.attention_mask(8)[0, 0]  # (T, T): causal within each document
    assert mask[3].tolist() == [False, False, True, True, False, False, False, False]
    assert mask[7].tolist() == [False] * 6 + [True, True]
    assert DocumentPacking(EOS)(tokens).loss_mask() is None  # no targets, or eod_mask_loss off


def test_loss_mask_leaves_out_the_predictions_across_a_document_end():
    model = model_of("gqa_mtp")
    inputs, targets, _ = batch()
    docs = DocumentPacking(EOS, mask_loss=True)(inputs, targets)
    out = model(inputs, targets, docs)
    counted = inputs != EOS
    expected = torch.nn.functional.cross_entropy(out.logits[counted], targets[counted])
    torch.testing.assert_close(lm_loss(out.logits, targets, docs.loss_mask()), expected, rtol=1e-6, atol=0)
    assert out.mtp_loss != model(inputs, targets).mtp_loss


def test_activation_checkpointing_gives_the_same_gradients():
    inputs, targets, _ = batch()
    grads = []
    for recompute in (False, True):
        model = model_of("mla_mtp")
        if recompute:
            apply_activation_checkpointing(model)
        docs = DocumentPacking(EOS, reset_positions=True, mask_loss=True)(inputs, targets)
        out = model(inputs, targets, docs)
        (lm_loss(out.logits, targets, docs.loss_mask()) + out.mtp_loss).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gqa", "mla"])
def test_a_block_with_the_mask_compiles_whole_and_matches_eager(name):
    """fullgraph: no graph break and no host read in the block, mask and per-sequence rotary
    tables passed in (aot_eager: Dynamo's and AOT autograd's graphs without generating C++)."""
    config = dataclasses.replace(
        gqa_config() if name == "gqa" else mla_config(), moe=MoEConfig(first_k_dense=2)
    )
    model = Transformer(config)
    block = model.layers["0"]
    inputs, targets, _ = batch()
    docs = DocumentPacking(EOS, reset_positions=True)(inputs, targets)
    cos, sin = (table[docs.positions].unsqueeze(1) for table in (model.rope_cos, model.rope_sin))
    x = torch.randn(2, inputs.shape[1], config.dim, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(block.forward, fullgraph=True, backend="aot_eager")
    eager_out, _ = block(x, cos, sin, docs.attention_mask(32))
    compiled_out, _ = compiled(x, cos, sin, docs.attention_mask(32))
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-6, atol=1e-6)


def test_generation_sees_only_the_prompts_document():
    """A prompt after an end-of-document token samples the same whatever came before it."""
    model = model_of("gqa").eval()
    packing = DocumentPacking(EOS, reset_positions=True)
    prompt = torch.tensor([[EOS, 11, 12, 13]])
    samples = [
        generate(model, torch.cat([before, prompt], 1), 6, top_k=1, documents=packing)[:, before.shape[1] :]
        for before in (torch.tensor([[3, 4, 5]]), torch.tensor([[9, 9, 9, 9, 9, 8]]))
    ]
    assert torch.equal(samples[0], samples[1])


def test_training_with_documents_apart_resumes_exactly(tmp_path, tiny_overrides):
    """A prepared corpus of short documents (several in each 32-token window): the masks come from the
    samples' tokens, a pure function of the data position, so a resumed run sees the same ones."""
    from moe_train.data.prepare import prepare

    source = tmp_path / "docs.jsonl"
    source.write_text(
        "".join(json.dumps({"text": f"doc {i}: " + "word " * (i % 9 + 3)}) + "\n" for i in range(200))
    )
    prepare([source], tmp_path / "corpus" / "c", vocab_size=300, workers=1, progress=False)
    data = [
        "data=indexed",
        f"data.prefixes=[{tmp_path / 'corpus' / 'c'}]",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    options = ["data.document_mask=true", "data.reset_positions=true", "data.eod_mask_loss=true"]
    common = [o for o in tiny_overrides[:-1] if not o.startswith("data=")] + data
    common += [
        "trainer.max_steps=4",
        "trainer.eval_every=2",
        "trainer.ckpt_every=0",
        "model.mtp.num_layers=1",
    ]
    whole = train([*common, *options, f"trainer.out_dir={tmp_path / 'whole'}"])
    train([*common, *options, f"trainer.out_dir={tmp_path / 'split'}", "trainer.exit_after_steps=2"])
    resumed = train([*common, *options, f"trainer.out_dir={tmp_path / 'split'}"])
    assert losses(resumed) == losses(whole)
    assert [m.get("val_loss") for m in resumed] == [m.get("val_loss") for m in whole]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["gqa_mtp", "mla_mtp"])
def test_on_a_gpu_compiled_flex_attention_trains_as_the_boolean_mask_does(name):
    """The GPU's default kernel, compiled, forward and backward, against SDPA's boolean mask."""
    inputs, targets = (t.cuda() for t in batch()[:2])
    results = []
    for kernel in ("flex", "sdpa"):
        model = model_of(name).cuda()
        docs = DocumentPacking(EOS, reset_positions=True, mask_loss=True, kernel=kernel)(inputs, targets)
        out = model(inputs, targets, docs)
        (lm_loss(out.logits, targets, docs.loss_mask()) + out.mtp_loss).backward()
        results.append([out.logits, *(p.grad for p in model.parameters())])
    for f, s in zip(*results):
        torch.testing.assert_close(f, s, rtol=1e-3, atol=1e-3)  # flex may multiply in TF32
