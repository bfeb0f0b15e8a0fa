"""Rotary-embedding scaling both ways: our model.rope_scaling <-> config.json's rope_parameters
(or its older rope_scaling), for plain rotary embeddings, Llama 3's llama3 and YaRN."""

from __future__ import annotations

from moe_train.config import ConfigError, ModelConfig, RopeScalingConfig


def rope_parameters(config: ModelConfig) -> dict:
    """config.json's rope_parameters for `config`."""
    scaling = config.rope_scaling
    if scaling.type == "none":
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    common = {
        "rope_type": scaling.type,
        "rope_theta": config.rope_theta,
        "factor": scaling.factor,
        "original_max_position_embeddings": scaling.original_max_seq_len,
    }
    if scaling.type == "llama3":
        return {
            **common,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
        }
    yarn = {**common, "beta_fast": scaling.beta_fast, "beta_slow": scaling.beta_slow}
    if scaling.mscale_all_dim:  # mscale counts only beside it (as in transformers)
        yarn["mscale_all_dim"] = scaling.mscale_all_dim
        if scaling.mscale:
            yarn["mscale"] = scaling.mscale
    return yarn


def rope_scaling(rope: dict) -> RopeScalingConfig:
    """Our rope scaling for a config.json's rope_parameters (or older rope_scaling)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return RopeScalingConfig()
    if rope_type not in ("llama3", "yarn"):
        raise ConfigError(
            f"rope type {rope_type!r} is not supported (plain rotary embeddings, Llama 3's llama3, or yarn)"
        )

    def number(key: str, default: float | None = None) -> float:
        if rope.get(key) is None:
            if default is None:
                raise ConfigError(f"the {rope_type} rope scaling in config.json lacks {key!r}")
            return default
        try:
            return float(rope[key])
        except (TypeError, ValueError):
            raise ConfigError(
                f"the rope scaling's {key}={rope[key]!r} in config.json is not a number"
            ) from None

    common = dict(type=rope_type, factor=number("factor"))
    common["original_max_seq_len"] = int(number("original_max_position_embeddings"))
    if rope_type == "llama3":
        return RopeScalingConfig(
            **common, low_freq_factor=number("low_freq_factor"), high_freq_factor=number("high_freq_factor")
        )
    if rope.get("attention_factor") is not None or rope.get("truncate", True) is False:
        raise ConfigError("yarn with attention_factor or truncate=false is not supported")
    return RopeScalingConfig(
        **common,
        beta_fast=number("beta_fast", 32.0),
        beta_slow=number("beta_slow", 1.0),
        mscale=number("mscale", 0.0),
        mscale_all_dim=number("mscale_all_dim", 0.0),
    )
