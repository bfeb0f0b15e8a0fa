"""The registry of architecture adapters, and what every architecture shares: choosing one for a
model, state dict <-> Hub tensors, config.json's common fields both ways, reading a model folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from moe_train.config import ConfigError, ModelConfig, first_line
from moe_train.tools.hf.adapter import Adapter
from moe_train.tools.hf.deepseek import DeepSeek
from moe_train.tools.hf.llama import Llama
from moe_train.tools.hf.mixtral import Mixtral
from moe_train.tools.hf.qwen2_moe import Qwen2Moe
from moe_train.tools.hf.rope import rope_parameters, rope_scaling

log = logging.getLogger(__name__)

# A model exports to the first adapter that claims it; import lists the model types in this order.
ADAPTERS: list[Adapter] = [Llama(), Mixtral(), Qwen2Moe(), DeepSeek("deepseek_v2"), DeepSeek("deepseek_v3")]
_BY_TYPE = {model_type: a for a in ADAPTERS for model_type in (a.model_type, *a.aliases)}


def _claiming(config: ModelConfig) -> Adapter:
    return next(a for a in ADAPTERS if a.claims(config))


def architecture(config: ModelConfig) -> str:
    """The transformers architecture (model_type) for `config`; `check_expressible` says whether
    it computes `config` exactly."""
    return _claiming(config).model_type


def check_expressible(config: ModelConfig, arch: str) -> None:
    """A ConfigError naming the first setting `arch` cannot compute exactly."""
    if config.moe.num_experts:
        _BY_TYPE[arch].check_expressible(config)


def to_hf(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensors (Hub key layout), all contiguous."""
    adapter = _claiming(config)
    arch = adapter.model_type
    check_expressible(config, arch)
    for key, value in state.items():
        if not adapter.routing_bias and key.endswith("router.expert_bias") and torch.count_nonzero(value):
            raise ConfigError(
                f"{key} is not zero: the routing bias of auxiliary-loss-free balancing "
                f"(model.moe.bias_update_rate) picks experts, which {arch} cannot express "
                "(DeepSeek-V3 can: model.mla with sigmoid scores)"
            )
    layout = adapter.layout(config)
    out = {theirs: state[ours] for ours, theirs in layout.plain}
    out.update({theirs: state[ours][rows] for ours, theirs, rows in layout.interleaved})
    for ours, parts in layout.experts:
        for keys, stacked in zip(parts, state[ours].chunk(len(parts), dim=-1)):
            out.update({key: w.T for key, w in zip(keys, stacked)})
    out.update({theirs: 2 * state[ours] for ours, theirs in layout.doubled})
    out.update({theirs: torch.zeros(shape) for theirs, shape in layout.zero})
    out.update({theirs: state[ours].clone() for ours, theirs in layout.copies})  # safetensors: unshared
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf(config: ModelConfig, tensors: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """HF tensors (Hub key layout) -> our state dict; every expected tensor must be there."""
    layout = _BY_TYPE[arch].layout(config)
    wanted = (
        [k for _, k in layout.plain + layout.doubled]
        + [k for _, k, _ in layout.interleaved]
        + [k for _, parts in layout.experts for keys in parts for k in keys]
        + [k for k, _ in layout.zero]
    )
    missing = [k for k in wanted if k not in tensors]
    if missing:
        raise ConfigError(f"the checkpoint lacks {len(missing)} expected tensors, e.g. {missing[0]}")
    for key, _ in layout.zero:
        if torch.count_nonzero(tensors[key]):
            raise ConfigError(
                f"{key} is not zero: this model gates its shared experts, which ours adds ungated; "
                "not importable"
            )
    state = {ours: tensors[theirs] for ours, theirs in layout.plain}
    state.update({ours: tensors[theirs][rows.argsort()] for ours, theirs, rows in layout.interleaved})
    state.update({ours: tensors[theirs] / 2 for ours, theirs in layout.doubled})
    for ours, parts in layout.experts:
        state[ours] = torch.cat([torch.stack([tensors[k].T for k in keys]) for keys in parts], dim=-1)
    if config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def hf_config(config: ModelConfig):
    """The transformers config object for `config`."""
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters=rope_parameters(config),
        tie_word_embeddings=config.tie_embeddings,
        hidden_act="silu",
        torch_dtype="float32",
    )
    return _claiming(config).hf_config(config, common)


def from_hf_config(hf: dict) -> tuple[ModelConfig, str]:
    """A transformers config.json (Llama, Mistral, Mixtral, Qwen2-MoE, DeepSeek-V2/V3) -> our
    ModelConfig and its type."""
    try:
        return _from_hf_config(hf)
    except KeyError as e:
        model_type = hf.get("model_type")
        raise ConfigError(f"config.json lacks {e.args[0]!r}, which a {model_type} model has") from None


def _from_hf_config(hf: dict) -> tuple[ModelConfig, str]:
    refuse_quantized_config(hf)
    model_type = hf.get("model_type")
    if model_type not in _BY_TYPE:
        raise ConfigError(f"model_type {model_type!r} is not supported; import takes {', '.join(_BY_TYPE)}")
    adapter = _BY_TYPE[model_type]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    scaling = rope_scaling(rope)
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("qkv_bias"):
        raise ConfigError("attention or MLP biases are not supported")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if not adapter.latent_attention and head_dim * heads != hf["hidden_size"]:
        raise ConfigError(
            f"head_dim {head_dim} x {heads} heads != hidden_size {hf['hidden_size']}; not supported"
        )
    max_len = hf.get("max_position_embeddings", 4096)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if window and window < max_len:  # full causal attention equals the window only up to its width
        log.warning(
            "sliding_window=%d in config.json: imported with model.max_seq_len=%d, not "
            "max_position_embeddings=%d, the length up to which our full causal attention equals the "
            "window (a larger model.max_seq_len beside trainer.init_from attends past the window)",
            window,
            window,
            max_len,
        )
        max_len = window
    sections = adapter.from_hf(hf)  # moe, mla, mtp where the architecture has them
    config = ModelConfig(
        name=f"{model_type}_import",
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_hidden_dim=hf["intermediate_size"],
        max_seq_len=max_len,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **sections,
    )
    return config, adapter.model_type


def read_hf_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and every tensor of a local HF model folder (model.safetensors or shards)."""
    from safetensors.torch import load_file

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder} has no config.json (expected a Hugging Face model folder)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{folder} has no model.safetensors (or index); only safetensors weights are read")
    hf = _read_json(config_path)
    refuse_quantized_config(hf)  # before reading what may be hundreds of gigabytes
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            part = load_file(folder / name)
        except Exception as e:  # missing, cut short (an interrupted download), not safetensors
            raise ConfigError(f"{folder / name} cannot be read: {first_line(e)}") from None
        refuse_quantized_tensors(part)
        tensors.update(part)
    return hf, tensors


# Quantized checkpoints: float8 codes, int8 and packed int4 (GPTQ/AWQ's int32, bitsandbytes' uint8)
# next to their scales. Cast to float they would be numbers of the wrong size, so they are refused
# whichever the architecture, also where config.json does not say so.
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_SCALE_SUFFIXES = ("_scale", "_scale_inv", ".scales")
_DEQUANTIZE = "convert them to bf16 first"


def refuse_quantized_config(hf: dict) -> None:
    """A ConfigError if config.json declares quantized weights."""
    quantization = hf.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise ConfigError(
            f"quantized weights are not supported: config.json has a quantization_config"
            f"{f' ({method})' if method else ''}; {_DEQUANTIZE}"
        )


def refuse_quantized_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """A ConfigError naming the first tensor (by name: a weight before its scale) that is quantized
    or a quantization scale."""
    for key, tensor in sorted(tensors.items()):
        if tensor.dtype not in _WEIGHT_DTYPES:
            what = str(tensor.dtype).removeprefix("torch.")
            raise ConfigError(f"quantized weights are not supported: {key} is {what}; {_DEQUANTIZE}")
        if key.endswith(_SCALE_SUFFIXES):
            raise ConfigError(
                f"quantized weights are not supported: {key} is a quantization scale; {_DEQUANTIZE}"
            )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
