"""Export a checkpoint to a Hugging Face model folder (safetensors, config.json, tokenizer).

    python -m moe_train.tools.export_hf CHECKPOINT_OR_RUN_DIR OUT_DIR

Dense models become Llama, MoE models Mixtral, or Qwen2-MoE where Mixtral cannot express them
(shared experts, unrenormalised top-k, dense layers); models with multi-head latent attention
DeepSeek-V3 (sigmoid routing, with any multi-token prediction modules) or DeepSeek-V2 (softmax).
See moe_train/tools/hf/. The folder loads with `AutoModelForCausalLM.from_pretrained(OUT_DIR)`
and gives our logits. It is written aside and renamed, so an interrupted export leaves no folder
that looks complete. A capacity factor used in training is a training-time token budget: the
exported model routes dropless (said when it is written). The tokenizer is the run's tokenizer.json
(data=stdlib, data=indexed) where it is on this machine, or for the byte-level stream
(data=stdlib_bytes) one that maps text to its UTF-8 bytes; without it the folder has none (said).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from moe_train.config import ConfigError
from moe_train.data import ByteTokenizer
from moe_train.data.loader import tokenizer_file
from moe_train.data.tokenizer import HFTokenizer
from moe_train.tools import hf
from moe_train.tools.cli import one_line_errors
from moe_train.tools.hf.tokenizer import EOS as BYTE_EOS
from moe_train.tools.hf.tokenizer import write_byte_tokenizer
from moe_train.train.checkpoint import load_model

SHARD_SIZE = "5GB"
log = logging.getLogger(__name__)


def export(checkpoint: str | Path, out_dir: str | Path) -> Path:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"{out_dir} already exists; choose another output folder")
    config, model = load_model(checkpoint)
    tensors = hf.to_hf(config.model, model.state_dict())  # refuses what transformers cannot compute exactly
    arch = hf.architecture(config.model)
    if config.model.mtp.num_layers and arch != "deepseek_v3":
        log.warning(
            "%s has no place for multi-token prediction modules: exported without them "
            "(the model's own logits do not use them)",
            arch,
        )
    moe = config.model.moe
    if moe.num_experts and moe.capacity_factor is not None:
        log.warning(
            "model.moe.capacity_factor=%s is a training-time token budget that %s has no place for: "
            "the exported model routes every token (dropless), as our sampling does",
            moe.capacity_factor,
            arch,
        )
    hf_config = hf.hf_config(config.model)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    path = tokenizer_file(config.data)
    tokenizer = HFTokenizer(path) if path is not None else None
    if tokenizer is not None:
        eos_id, eos_token = tokenizer.eos_id, tokenizer.eos_token
    elif config.data.name == "stdlib_bytes":
        eos_id, eos_token = ByteTokenizer().eos_id, BYTE_EOS
    else:
        eos_id = eos_token = None
        log.warning("the tokenizer of data=%s is not on this machine: exported without one", config.data.name)
    try:
        hf_config.architectures = [type(hf_config).__name__.replace("Config", "ForCausalLM")]
        # documents are separated by the end-of-document token: it also starts one
        hf_config.bos_token_id = hf_config.eos_token_id = eos_id
        hf_config.save_pretrained(tmp)
        split = split_torch_state_dict_into_shards(tensors, max_shard_size=SHARD_SIZE)
        for filename, names in split.filename_to_tensors.items():
            save_file({n: tensors[n] for n in names}, tmp / filename, metadata={"format": "pt"})
        if split.is_sharded:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": split.tensor_to_filename,
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if tokenizer is not None:
            shutil.copy(tokenizer.path, tmp / "tokenizer.json")
        elif eos_token is not None:
            write_byte_tokenizer(tmp / "tokenizer.json")
        if eos_token is not None:
            (tmp / "tokenizer_config.json").write_text(
                json.dumps(
                    {
                        "tokenizer_class": "PreTrainedTokenizerFast",
                        "eos_token": eos_token,
                        "model_max_length": config.model.max_seq_len,
                        "clean_up_tokenization_spaces": False,
                    },
                    indent=2,
                )
            )
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moe_train.tools.export_hf", description=__doc__.split("\n")[0]
    )
    parser.add_argument("checkpoint", help="a checkpoint or run directory")
    parser.add_argument("out_dir", help="the Hugging Face folder to write (must not exist)")
    args = parser.parse_args(argv)
    with one_line_errors():
        out = export(args.checkpoint, args.out_dir)
    print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    main(sys.argv[1:])
