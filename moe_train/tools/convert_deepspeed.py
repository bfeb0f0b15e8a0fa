"""Turn a DeepSpeed checkpoint (engine=deepspeed) into a native weights-only checkpoint.

    python -m moe_train.tools.convert_deepspeed CHECKPOINT_OR_RUN_DIR OUT_DIR
    python train.py trainer.init_from=OUT_DIR ...     # or export_hf / inspect it, at any ep

The non-expert weights come from DeepSpeed's mp_rank_00_model_states.pt, the experts from its
per-expert files, stacked again; the result is the single-process model in DCP, exactly what
import_hf and upcycle write. (The tools also read DeepSpeed checkpoints directly; this makes a
portable copy, without the ZeRO optimizer shards.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_train.config import ConfigError
from moe_train.tools.cli import one_line_errors
from moe_train.train.checkpoint import is_deepspeed, load_model, resolve_checkpoint, save_weights


def convert(checkpoint: str | Path, out_dir: str | Path) -> Path:
    path = resolve_checkpoint(checkpoint)
    if not is_deepspeed(path):
        raise ConfigError(f"{path} is not a DeepSpeed checkpoint (written with engine=deepspeed)")
    config, model = load_model(path)
    return save_weights(config, model, out_dir)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m moe_train.tools.convert_deepspeed", description=__doc__.split("\n")[0]
    )
    parser.add_argument("checkpoint", help="a DeepSpeed checkpoint folder or a run directory")
    parser.add_argument("out_dir", help="the native checkpoint folder to write (must not exist)")
    args = parser.parse_args(argv)
    with one_line_errors():
        out = convert(args.checkpoint, args.out_dir)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
