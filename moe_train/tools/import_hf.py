"""Import a local Hugging Face folder (Llama, Mistral, Mixtral, Qwen2-MoE, DeepSeek-V2/V3) as a checkpoint.

    python -m moe_train.tools.import_hf HF_DIR OUT_DIR
    python train.py trainer.init_from=OUT_DIR data=indexed ...     # continue pretraining from it

Reads config.json and safetensors weights (sharded or not); nothing is downloaded. Llama 3.x's
rope scaling and YaRN (DeepSeek-V2/V3's) are kept (model.rope_scaling), so a Llama 3 imported here
can be upcycled into an MoE and a DeepSeek-V2-Lite trained on.
OUT_DIR is a weights-only checkpoint whose config.yaml carries the architecture;
`trainer.init_from` starts a run from it with a fresh optimizer. Mistral's sliding window becomes
model.max_seq_len (full causal attention equals sliding-window attention up to the window), and a
DeepSeek-V2's norm_topk_prob=true is not applied (as in transformers): both said on import.
Quantized checkpoints (a quantization_config, float8 or integer tensors, quantization scales) are
refused, whatever the architecture. A DeepSeek-V3 model comes with V3's training-time balancing
(the routing bias moved by 0.001 per step, a sequence-wise aux loss of 0.0001) and its multi-token
prediction module where the checkpoint has one, weighed 0.1 (V3's weight for its last 4.8T tokens);
change them with model.moe.* and model.mtp.* overrides beside trainer.init_from.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import torch

from moe_train.config import Config, ConfigError, DataConfig, MTPConfig
from moe_train.model import Transformer
from moe_train.tools import hf
from moe_train.tools.cli import one_line_errors
from moe_train.train.checkpoint import save_weights

log = logging.getLogger(__name__)


def import_folder(hf_dir: str | Path, out_dir: str | Path) -> Path:
    hf_config, tensors = hf.read_hf_folder(Path(hf_dir))
    model_config, arch = hf.from_hf_config(hf_config)
    mtp_key = f"model.layers.{model_config.num_layers}.eh_proj.weight"
    if model_config.mtp.num_layers and mtp_key not in tensors:
        log.warning(
            "config.json has %d multi-token prediction layers but the weights lack them (%s): "
            "imported without (model.mtp.num_layers=0)",
            model_config.mtp.num_layers,
            mtp_key,
        )
        model_config = dataclasses.replace(model_config, mtp=MTPConfig())
    state = hf.from_hf(model_config, tensors, arch)
    with torch.device("meta"):
        model = Transformer(model_config)
    model = model.to_empty(device="cpu")
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:  # shapes that do not fit config.json
        reason = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise ConfigError(f"the weights of {hf_dir} do not fit its config.json: {reason}") from None
    model.init_rope()
    data = DataConfig(seq_len=min(DataConfig.seq_len, model_config.max_seq_len))
    return save_weights(Config(model=model_config, data=data), model, out_dir)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moe_train.tools.import_hf", description=__doc__.split("\n")[0]
    )
    parser.add_argument("hf_dir", help="a local Hugging Face model folder (config.json + safetensors)")
    parser.add_argument("out_dir", help="the checkpoint folder to write (must not exist)")
    args = parser.parse_args(argv)
    with one_line_errors():
        out = import_folder(args.hf_dir, args.out_dir)
    print(f"wrote {out}: start a run from it with trainer.init_from={out}")


if __name__ == "__main__":
    main(sys.argv[1:])
