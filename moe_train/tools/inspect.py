"""Parameter and FLOP counts of a preset, to size a run before training it: the model is built on the
meta device, so full-size presets cost no memory."""

from __future__ import annotations

import json
import sys

import torch

from moe_train.config import Config
from moe_train.data.loader import tokenizer_vocab_size
from moe_train.model import Transformer, model_size
from moe_train.tools.cli import one_line_errors
from moe_train.tools.hydra_config import compose_config


def inspect_config(config: Config) -> dict:
    """The counts as JSON fields. active_params is what one token passes through, embeddings included;
    total and active count multi-token prediction modules, which the mtp_ fields give on their own.
    flops_per_token is per training token (forward and backward), as `model_size` counts it."""
    if config.model.vocab_size is None:
        config.model.vocab_size = tokenizer_vocab_size(config)
    with torch.device("meta"):
        model = Transformer(config.model)
    size = model_size(model, config.data.seq_len)
    moe = config.model.moe
    return {
        "model": config.model.name,
        "total_params": size.total_params,
        "active_params": size.active_params,
        "active_matmul_params": size.active_matmul_params,
        "flops_per_token": size.flops_per_token,
        "mtp_params": size.mtp_params,
        "mtp_active_params": size.mtp_active_params,
        "seq_len": config.data.seq_len,
        "vocab_size": config.model.vocab_size,
        "num_layers": config.model.num_layers,
        "moe_layers": sum(block.is_moe for block in model.layers.values()),
        "mtp_layers": config.model.mtp.num_layers,
        "num_experts": moe.num_experts,
        "top_k": moe.top_k if moe.num_experts else 0,
        "num_shared_experts": moe.num_shared_experts,
    }


def main(argv: list[str]) -> None:
    """python -m moe_train.tools.inspect model=mixtral_8x7b [data.seq_len=4096]: Hydra overrides in,
    JSON out."""
    with one_line_errors():
        print(json.dumps(inspect_config(compose_config(argv)), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
