"""Hugging Face interop, checked against the real transformers: export gives the same logits,
import gives back the same weights, and what cannot be exported exactly is refused."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moe_train.config import ConfigError, MLAConfig
from moe_train.data import ByteTokenizer
from moe_train.model import Transformer
from moe_train.tools import import_hf
from moe_train.tools.export_hf import export
from moe_train.tools.hf import architecture, from_hf_config, to_hf
from moe_train.tools.hydra_config import compose_config
from moe_train.tools.import_hf import import_folder
from moe_train.train.checkpoint import load_config, load_model, resolve_checkpoint, save_weights
from moe_train.train.trainer import run
from tests.conftest import TINY

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]


def trained(tmp_path, *overrides, name="run"):
    out = tmp_path / name
    run(
        compose_config(
            [
                *TINY,
                f"trainer.out_dir={out}",
                "trainer.max_steps=2",
                "trainer.num_samples=0",
                "trainer.eval_every=0",
                *overrides,
            ]
        )
    )
    return out


def initialised(tmp_path, *overrides):
    """A checkpoint of a model at its initialisation: for what training would not change."""
    config = compose_config([*TINY, "model.vocab_size=256", *overrides])
    return save_weights(config, Transformer(config.model), tmp_path / "init")


def logits_agree(ours, hf_model, vocab, length=24):
    tokens = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (ours(tokens).logits - hf_model(tokens).logits).abs().max().item()


V2_TINY = [
    "model=deepseek_v3_tiny",
    "model.mla.q_lora_rank=0",
    "model.moe.score_function=softmax",
    "model.moe.renormalize=false",
    "model.moe.bias_update_rate=0",
    "model.moe.num_expert_groups=8",
    "model.moe.topk_groups=4",
]


@pytest.mark.parametrize(
    "overrides,architecture",
    [
        (["model=dense_tiny"], "LlamaForCausalLM"),
        ([], "MixtralForCausalLM"),
        (["model.tie_embeddings=true", "model.moe.top_k=1"], "MixtralForCausalLM"),
        (["model=deepseekmoe_tiny"], "Qwen2MoeForCausalLM"),
        (["model.moe.every_n_layers=2", "model.moe.renormalize=false"], "Qwen2MoeForCausalLM"),
        # MLA, query latent, sigmoid, groups, scaling, and a routing bias moved by 2 steps
        (["model=deepseek_v3_tiny"], "DeepseekV3ForCausalLM"),
        (V2_TINY, "DeepseekV2ForCausalLM"),
        # multi-token prediction: V3's checkpoint layout (transformers skips it), none in Mixtral's
        (["model=deepseek_v3_tiny", "model.mtp.num_layers=1"], "DeepseekV3ForCausalLM"),
        (["model.mtp.num_layers=1"], "MixtralForCausalLM"),
    ],
    ids=[
        "dense",
        "mixtral",
        "tied-top1",
        "shared-experts",
        "every-2nd-unnormalised",
        "mla-v3",
        "mla-v2",
        "mla-v3-mtp",
        "mixtral-mtp",
    ],  # fmt: skip
)
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, overrides, architecture):
    run_dir = trained(tmp_path, *overrides)
    out = export(run_dir, tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(hf_model).__name__ == architecture
    assert hf_model.generation_config.eos_token_id == 0  # the byte stream's end-of-document token
    _, ours = load_model(run_dir)
    assert logits_agree(ours, hf_model, 256) < 1e-4


@pytest.mark.parametrize(
    "overrides",
    [[], ["model=deepseek_v3_tiny", "model.mtp.num_layers=2"], V2_TINY],
    ids=["mixtral", "v3-mtp", "v2"],
)
def test_export_then_import_gives_back_the_same_weights_and_routing(tmp_path, overrides):
    run_dir = trained(tmp_path, *overrides)
    export(run_dir, tmp_path / "hf")
    imported = import_folder(tmp_path / "hf", tmp_path / "imported")
    source, original = load_model(run_dir)
    config, again = load_model(imported)
    for key in ("num_experts", "top_k", "score_function", "renormalize", "num_expert_groups", "topk_groups",
                "routed_scaling_factor", "first_k_dense"):  # fmt: skip
        assert getattr(config.model.moe, key) == getattr(source.model.moe, key), key
    assert config.model.mla == source.model.mla
    assert config.model.mtp.num_layers == source.model.mtp.num_layers
    for (name, a), (_, b) in zip(original.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "overrides,architecture_name",
    [(["model.mtp.num_layers=1"], "DeepseekV3ForCausalLM"), (["model.moe.score_function=softmax"], "DeepseekV2ForCausalLM")],
    ids=["v3-mtp", "v2"],
)  # fmt: skip
def test_a_dense_model_with_latent_attention_round_trips(tmp_path, overrides, architecture_name):
    """No routed experts: every layer dense (first_k_dense_replace = the layer count); the import
    reads no routing and keeps the architecture, so that the model exports back to the same one."""
    dense = ["model=deepseek_v3_tiny", "model.moe.num_experts=0", "model.moe.num_shared_experts=0"]
    source = initialised(tmp_path, *dense, *overrides)
    out = export(source, tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(hf_model).__name__ == architecture_name
    _, original = load_model(source)
    assert logits_agree(original, hf_model, 256) < 1e-4
    config, again = load_model(import_folder(out, tmp_path / "imported"))
    assert config.model.moe.num_experts == 0 and config.model.mla == load_config(source).model.mla
    assert architecture(config.model) == architecture(load_config(source).model)
    for (name, a), (_, b) in zip(original.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert logits_agree(original, again, 256) == 0


def test_a_deepseek_v3_whose_weights_lack_its_mtp_module_imports_without_it(tmp_path, caplog):
    out = export(trained(tmp_path, "model=deepseek_v3_tiny"), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    imported = import_folder(out, tmp_path / "imported")
    assert load_config(imported).model.mtp.num_layers == 0
    layers = config["num_hidden_layers"]
    assert f"the weights lack them (model.layers.{layers}.eh_proj.weight)" in caplog.text


def test_import_a_transformers_mistral_and_train_from_it(tmp_path, caplog):
    config = transformers.MistralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=32,
        max_position_embeddings=128,
        rope_theta=5e5,
    )
    torch.manual_seed(0)
    mistral = transformers.AutoModelForCausalLM.from_config(config)
    mistral.save_pretrained(tmp_path / "mistral")
    out = import_folder(tmp_path / "mistral", tmp_path / "ours")
    assert (
        "sliding_window=32 in config.json: imported with model.max_seq_len=32, not "
        "max_position_embeddings=128, the length up to which our full causal attention equals the window"
    ) in caplog.text
    model_config, ours = load_model(out)
    assert model_config.model.max_seq_len == 32  # the sliding window
    assert logits_agree(ours, mistral, 256, length=32) < 1e-4  # exact up to the window
    with pytest.raises(ConfigError, match="data.seq_len=64 must be <= model.max_seq_len=32"):
        trained(tmp_path, f"trainer.init_from={out}", "data.seq_len=64", name="longer")
    trained(tmp_path, f"trainer.init_from={out}")


def test_a_llama3_with_scaled_rotary_frequencies_imports_exports_and_trains(tmp_path):
    """Llama 3.1's rope scaling (what Llama 3.x checkpoints carry): imported, the same logits as
    transformers at positions well past the original context; exported back, the same config."""
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_parameters=rope,
    )  # fmt: skip
    torch.manual_seed(0)
    llama = transformers.AutoModelForCausalLM.from_config(config)
    llama.save_pretrained(tmp_path / "llama3")
    out = import_folder(tmp_path / "llama3", tmp_path / "ours")
    model_config, ours = load_model(out)
    assert model_config.model.rope_scaling.type == "llama3"
    tokens = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(tokens).logits - llama(tokens).logits).abs().max() < 1e-4
    back = export(out, tmp_path / "hf")
    assert transformers.AutoConfig.from_pretrained(back).rope_parameters == rope
    trained(tmp_path, f"trainer.init_from={out}", "model.num_kv_heads=2", "data.seq_len=32")


@pytest.mark.parametrize("model_type,mscale", [("deepseek_v3", 1.0), ("deepseek_v2", 0.707)])
def test_a_deepseek_with_yarn_imports_with_the_same_logits_and_exports_back(
    tmp_path, caplog, model_type, mscale
):
    """DeepSeek-V2/V3's published checkpoints extend their context with YaRN: frequencies
    interpolated, and the softmax scale multiplied by m(mscale_all_dim)^2 = (1 + 0.1 mscale
    ln(factor))^2. Positions up to 96 with an original context of 16. The V2 one says
    norm_topk_prob=true, which transformers does not apply: imported as it computes, with a notice."""
    rope = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 16,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": mscale, "mscale_all_dim": mscale}  # fmt: skip
    shape = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=128, rope_parameters=rope,
    )  # fmt: skip
    if model_type == "deepseek_v3":
        config = transformers.DeepseekV3Config(q_lora_rank=24, n_group=1, topk_group=1, **shape)
    else:
        config = transformers.DeepseekV2Config(
            q_lora_rank=None, topk_method="greedy", norm_topk_prob=True, **shape
        )
    torch.manual_seed(0)
    deepseek = transformers.AutoModelForCausalLM.from_config(config)
    deepseek.save_pretrained(tmp_path / model_type)
    out = import_folder(tmp_path / model_type, tmp_path / "ours")
    model_config, ours = load_model(out)
    assert model_config.model.rope_scaling.type == "yarn"
    assert model_config.model.moe.renormalize == (model_type == "deepseek_v3")  # both say norm_topk_prob=true
    ignored = (
        "norm_topk_prob=true in config.json is not applied: transformers' DeepSeek-V2 does not renormalise"
    )
    assert (ignored in caplog.text) == (model_type == "deepseek_v2")
    tokens = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(tokens).logits - deepseek(tokens).logits).abs().max() < 1e-4
    back = export(out, tmp_path / "hf")
    assert transformers.AutoConfig.from_pretrained(back).rope_parameters == rope


@pytest.mark.parametrize(
    "rope,message",
    [
        ({"rope_type": "yarn", "factor": "abc", "original_max_position_embeddings": 64},
         "the rope scaling's factor='abc' in config.json is not a number"),
        ({"rope_type": "yarn", "factor": 4.0}, "the yarn rope scaling in config.json lacks 'original_max_position_embeddings'"),
        ({"rope_type": "yarn", "factor": float("inf"), "original_max_position_embeddings": 64},
         "model.rope_scaling.factor=inf must be a finite number >= 1"),
        ({"rope_type": "dynamic", "factor": 2.0}, "rope type 'dynamic' is not supported"),
    ],
    ids=["not-a-number", "lacks-original", "infinite", "dynamic"],
)  # fmt: skip
def test_bad_rope_scaling_in_a_config_json_is_one_line(rope, message):
    llama = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
             "num_hidden_layers": 2, "num_attention_heads": 4, "rope_parameters": rope}  # fmt: skip
    with pytest.raises(ConfigError) as error:
        from_hf_config(llama)
    assert str(error.value).startswith(message)


def test_shared_experts_round_trip_through_qwen2_moe_and_gated_ones_are_refused(tmp_path):
    run_dir = trained(tmp_path, "model=deepseekmoe_tiny")
    out = export(run_dir, tmp_path / "hf")
    imported = import_folder(out, tmp_path / "back")
    _, original = load_model(run_dir)
    config, again = load_model(imported)
    assert (config.model.moe.num_shared_experts, config.model.moe.first_k_dense) == (2, 1)
    for (name, a), (_, b) in zip(original.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    qwen = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        qwen.model.layers[1].mlp.shared_expert_gate.weight.fill_(0.1)  # a gate our model does not have
    qwen.save_pretrained(tmp_path / "gated")
    with pytest.raises(ConfigError, match="shared_expert_gate.weight is not zero"):
        import_folder(tmp_path / "gated", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_unsupported_architectures_are_refused_in_one_line(tmp_path):
    gpt2 = transformers.AutoModelForCausalLM.from_config(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)
    )
    gpt2.save_pretrained(tmp_path / "gpt2")
    result = subprocess.run(
        [sys.executable, "-m", "moe_train.tools.import_hf", str(tmp_path / "gpt2"), str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: model_type 'gpt2' is not supported; import takes llama, mistral, mixtral, qwen2_moe, "
        "deepseek_v2, deepseek_v3"
    )
    assert not (tmp_path / "out").exists()


def test_export_of_a_byte_level_run_with_a_capacity_factor(tmp_path, caplog):
    """An existing folder is refused; the capacity factor that is not exported is said; the byte
    stream's tokenizer goes out as a tokenizer.json that gives ByteTokenizer's ids."""
    run_dir = trained(tmp_path, "model.moe.capacity_factor=1.25")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        export(run_dir, tmp_path / "taken")
    out = export(run_dir, tmp_path / "hf")
    assert (
        "model.moe.capacity_factor=1.25 is a training-time token budget that mixtral has no place for: "
        "the exported model routes every token (dropless), as our sampling does"
    ) in caplog.messages
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token_id == 0 and len(tokenizer) == 256
    byte = ByteTokenizer()
    for text in ["def f(x):\n\treturn x , 1", "é ü 漢字 🙂", "a\x00b", "<0x00> <0xC3> Ā <|endoftext|>", ""]:
        ids = tokenizer(text)["input_ids"]
        assert ids == byte.encode(text), text
        assert tokenizer.decode([*ids, 0], skip_special_tokens=True) == byte.decode([*ids, 0])


# (how the checkpoint is quantized, the message naming it)
QUANTIZED = {
    "fp8-declared": ("quantization_config", "config.json has a quantization_config (fp8)"),
    "fp8": (torch.float8_e4m3fn, "model.layers.0.self_attn.o_proj.weight is float8_e4m3fn"),
    "int8": (torch.int8, "model.layers.0.self_attn.o_proj.weight is int8"),
    "uint8-packed-int4": (torch.uint8, "model.layers.0.self_attn.o_proj.weight is uint8"),
    "int32-packed-int4": (torch.int32, "model.layers.0.self_attn.o_proj.weight is int32"),
    "scale-only": ("weight_scale", "model.layers.0.self_attn.o_proj.weight_scale is a quantization scale"),
}


@pytest.mark.parametrize(
    "model_type,quantized",
    [("llama", "fp8-declared"), ("mistral", "fp8"), ("mixtral", "int8"), ("qwen2_moe", "uint8-packed-int4"),
     ("llama", "int32-packed-int4"), ("mixtral", "scale-only")],
)  # fmt: skip
def test_quantized_folders_are_refused_in_one_line_whatever_the_architecture(
    tmp_path, capsys, model_type, quantized
):
    """Quantized codes cast to float are numbers of the wrong size: refused, whether config.json
    declares them or only the tensors show it (their dtype, or a scale beside them)."""
    from safetensors.torch import load_file, save_file

    shape = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    config = {
        "llama": lambda: transformers.LlamaConfig(**shape),
        "mistral": lambda: transformers.MistralConfig(**shape, sliding_window=None),
        "mixtral": lambda: transformers.MixtralConfig(**shape, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**shape, num_experts=4, **moe),
    }[model_type]()
    folder = tmp_path / model_type
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    how, message = QUANTIZED[quantized]
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.0.self_attn.o_proj.weight"
    if how == "quantization_config":
        hf = json.loads((folder / "config.json").read_text())
        hf["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
        (folder / "config.json").write_text(json.dumps(hf))
        tensors[key] = tensors[key].to(torch.float8_e4m3fn)
        tensors[key + "_scale_inv"] = torch.ones(1)
    elif how == "weight_scale":
        tensors[key + "_scale"] = torch.ones(1)
    elif how.is_floating_point:  # DeepSeek-V3's layout: float8 codes and their inverse scales
        tensors[key] = tensors[key].to(how)
        tensors[key + "_scale_inv"] = torch.ones(1)
    else:  # integer codes, such as packed int4 pairs or bitsandbytes' bytes
        tensors[key] = tensors[key].to(torch.float8_e4m3fn).view(torch.uint8).to(how)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()  # transformers' progress bars
    with pytest.raises(SystemExit) as exit_code:
        import_hf.main([str(folder), str(tmp_path / "out")])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err == (
        f"error: quantized weights are not supported: {message}; convert them to bf16 first\n"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_export_refuses_routing_it_cannot_express(tmp_path):
    run_dir = trained(tmp_path, "model.moe.score_function=sigmoid")
    with pytest.raises(ConfigError, match="^model.moe.score_function=sigmoid: Mixtral and Qwen2-MoE route"):
        export(run_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    config = load_config(resolve_checkpoint(run_dir)).model
    for setting, moe in [
        ("topk_groups=1", replace(config.moe, score_function="softmax", num_expert_groups=2, topk_groups=1)),
        (
            "routed_scaling_factor=2.5",
            replace(config.moe, score_function="softmax", routed_scaling_factor=2.5),
        ),
    ]:
        with pytest.raises(ConfigError, match=f"^model.moe.{setting}: Mixtral and Qwen2-MoE route"):
            to_hf(replace(config, moe=moe), {})
    mla = MLAConfig(kv_lora_rank=16)
    for moe, message in [
        (
            replace(config.moe, score_function="sigmoid", num_expert_groups=4, topk_groups=2),
            "^model.moe.topk_groups=2 with model.moe.top_k=2: deepseek_v3 ranks groups by their best 2 "
            "score\\(s\\): top_k must be 2 x topk_groups",
        ),
        (
            replace(config.moe, score_function="softmax"),
            "^model.moe.renormalize=true: DeepSeek-V2 \\(softmax routing\\) never renormalises",
        ),
    ]:
        with pytest.raises(ConfigError, match=message):
            to_hf(replace(config, mla=mla, moe=moe), {})


# ---- growing a model: sparse upcycling and depth up-scaling ----


def test_upcycled_full_copies_compute_the_dense_model_and_train_on(tmp_path):
    from moe_train.tools.upcycle import upcycle

    dense_dir = trained(
        tmp_path, "model=dense_tiny", "model.ffn_hidden_dim=96", "model.mtp.num_layers=1", name="dense"
    )
    out = upcycle(dense_dir, tmp_path / "moe", num_experts=4, top_k=2)
    config, moe = load_model(out)
    _, dense = load_model(dense_dir)
    assert config.model.moe.num_experts == 4 and moe.moe_layer_ids == [0, 1, 2]  # 2: the MTP block
    assert config.model.name == "dense_tiny_4x_top2"  # not the source's: runs/<name> is its run directory
    tokens = torch.randint(0, 256, (2, 25))
    with torch.no_grad():
        a, b = moe(tokens[:, :-1], tokens[:, 1:]), dense(tokens[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.mtp_loss, b.mtp_loss, rtol=1e-5, atol=1e-5)
    trained(tmp_path, f"trainer.init_from={out}")


def test_fine_grained_upcycling_starts_close_and_bad_granularity_is_refused(tmp_path):
    from moe_train.tools.upcycle import upcycle

    dense_dir = trained(tmp_path, "model=dense_tiny", "model.ffn_hidden_dim=96", name="dense")
    out = upcycle(dense_dir, tmp_path / "fine", num_experts=8, top_k=2, granularity=2)
    _, moe = load_model(out)
    _, dense = load_model(dense_dir)
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        a, b = moe(tokens).logits, dense(tokens).logits
    assert ((a - b).norm() / b.norm()).item() < 0.5  # close, not equal: see the tool's docstring
    with pytest.raises(ConfigError, match="must divide the dense FFN's hidden size 96"):
        upcycle(dense_dir, tmp_path / "bad", num_experts=10, top_k=2, granularity=5)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("preset", ["dense_tiny", "deepseekmoe_tiny"])
def test_depth_upscaling_stacks_two_trimmed_copies(tmp_path, preset):
    from moe_train.tools.depth_upscale import depth_upscale

    src = trained(tmp_path, f"model={preset}", "model.num_layers=4", "model.mtp.num_layers=1", name="src")
    out = depth_upscale(src, tmp_path / "deep", drop=1)
    config, deep = load_model(out)
    _, shallow = load_model(src)
    assert config.model.num_layers == 6 and config.model.name == f"{preset}_6l"
    old, new = shallow.state_dict(), deep.state_dict()
    for i, j in enumerate([0, 1, 2, 1, 2, 3]):  # first copy minus its last layer, second minus its first
        for name in (k for k in old if k.startswith(f"layers.{j}.")):
            assert torch.equal(new[name.replace(f"layers.{j}.", f"layers.{i}.", 1)], old[name])
    for name in (k for k in old if not k.startswith("layers.")):  # embeddings, head, MTP module
        assert torch.equal(new[name], old[name])
    for drop in (2, 3):  # 2 = n/2 would give back the source model
        with pytest.raises(ConfigError, match=f"--drop={drop} must be >= 0 and below n/2 = 2 for a 4-layer"):
            depth_upscale(src, tmp_path / "bad", drop=drop)
    # TINY's model.num_layers=2 would apply over the architecture: give the new depth
    trained(tmp_path, f"trainer.init_from={out}", "model.num_layers=6")
