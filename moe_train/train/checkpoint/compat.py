"""Whether a checkpoint may resume this run: its config.yaml, read back, must name the engine this
run uses and the same model settings that shape a tensor."""

from __future__ import annotations

import json
import operator
from pathlib import Path

from omegaconf import OmegaConf

from moe_train.config import Config, ConfigError, ModelConfig
from moe_train.train.checkpoint.dcp_io import reason

# the model.* settings a checkpoint's tensors are shaped by (the rest may change on resume)
ARCHITECTURE = (
    "vocab_size",
    "dim",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "ffn_hidden_dim",
    "tie_embeddings",
    "moe.num_experts",
    "moe.num_shared_experts",
    "moe.expert_hidden_dim",
    "moe.first_k_dense",
    "moe.every_n_layers",
    "mla.kv_lora_rank",
    "mla.q_lora_rank",
    "mla.qk_nope_head_dim",
    "mla.qk_rope_head_dim",
    "mla.v_head_dim",
    "mtp.num_layers",
)


# settings that older versions wrote into config.yaml and this one no longer has
RETIRED = (("parallel", "ep_overlap_chunks"),)


class CheckpointMismatch(ConfigError):
    """The checkpoint is not this run's kind (another engine, another architecture): unlike a
    damaged one, no other checkpoint of the same run would fit either."""


def load_config(checkpoint: str | Path) -> Config:
    """The configuration a checkpoint was written with."""
    checkpoint = Path(checkpoint)
    if not ((checkpoint / "config.yaml").is_file() and (checkpoint / ".metadata").is_file()):
        raise ConfigError(
            f"{checkpoint} is not a moe_train checkpoint (a folder with config.yaml and DCP's .metadata)"
        )
    schema = OmegaConf.structured(Config)
    try:
        saved = OmegaConf.load(checkpoint / "config.yaml")
        for section, key in RETIRED:  # written by an older version: nothing to restore from them
            if OmegaConf.is_dict(saved) and OmegaConf.is_dict(saved.get(section)):
                saved[section].pop(key, None)
        return OmegaConf.to_object(OmegaConf.merge(schema, saved))
    except ConfigError:
        raise
    except Exception as e:  # YAML that does not parse, or keys / values the schema refuses
        raise ConfigError(f"{checkpoint / 'config.yaml'} is damaged: {reason(e)}") from None


def refuse_other_kind(path: Path, saved: Config, engine: str, model: ModelConfig) -> None:
    """A CheckpointMismatch unless the checkpoint at `path` (`saved`: its config) was written by
    `engine` (this run's engine.name) for the architecture of `model` (this run's)."""
    if saved.engine.name != engine:
        raise CheckpointMismatch(
            f"checkpoint {path} was written by engine={saved.engine.name} and this run uses "
            f"engine={engine}; resume with engine={saved.engine.name}, "
            f"or start from its weights with trainer.init_from={path}"
        )
    _refuse_other_architecture(path, saved.model, model)


def _refuse_other_architecture(path: Path, saved: ModelConfig, model: ModelConfig) -> None:
    """Resuming keeps the architecture: name the first setting that shapes a tensor and differs."""
    for key in ARCHITECTURE:
        # an unset expert size is the dense FFN's: compare what it resolves to
        get = (
            ModelConfig.expert_hidden_dim.fget if key == "moe.expert_hidden_dim" else operator.attrgetter(key)
        )
        theirs, ours = get(saved), get(model)
        if theirs != ours:
            hint = (
                ", or add or drop depths in a new run started from it (trainer.init_from)"
                if key == "mtp.num_layers"
                else ""
            )
            raise CheckpointMismatch(
                f"checkpoint {path} has model.{key}={json.dumps(theirs)} but this run asks for "
                f"model.{key}={json.dumps(ours)}: resume with the checkpoint's value{hint}"
            )
