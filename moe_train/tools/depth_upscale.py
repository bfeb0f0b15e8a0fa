"""Depth up-scaling (SOLAR, Kim et al. 2023): a deeper model from an n-layer checkpoint, so that a
larger model continues from what the smaller one learned instead of starting from scratch."""

from __future__ import annotations

import dataclasses
import sys

from moe_train.config import ConfigError
from moe_train.model import Transformer
from moe_train.tools.cli import one_line_errors, tool_parser
from moe_train.train.checkpoint import load_model, save_weights


def depth_upscale(checkpoint: str, out_dir: str, drop: int | None = None):
    """Stack the layers of two copies, the first without its last `drop` layers and the second without
    its first, and save the result. Dense and MoE alike, as long as an MoE model's dense/MoE layer
    pattern comes out where its config would place it; multi-token prediction modules, which follow
    the last layer, are kept as they are."""
    config, model = load_model(checkpoint)
    n = config.model.num_layers
    m = n // 4 if drop is None else drop
    if not 0 <= 2 * m < n:  # at m = n/2 the two halves stack back into the model itself
        raise ConfigError(f"--drop={m} must be >= 0 and below n/2 = {n / 2:g} for a {n}-layer model")
    sources = list(range(n - m)) + list(range(m, n))  # new layer i <- old layer sources[i]
    # a name of its own: runs default to runs/<model name>, where the source run's checkpoints are
    name = f"{config.model.name}_{len(sources)}l"
    new_model_config = dataclasses.replace(config.model, name=name, num_layers=len(sources))
    depths = range(config.model.mtp.num_layers)  # multi-token prediction's blocks come after the layers
    pairs = [*enumerate(sources), *((len(sources) + k, n + k) for k in depths)]
    for i, j in pairs:
        if new_model_config.is_moe_layer(i) != config.model.is_moe_layer(j):
            raise ConfigError(
                f"layer {j} would become layer {i}, where the MoE layer pattern (first_k_dense, "
                "every_n_layers) puts the other kind of FFN; choose another --drop"
            )
    new_config = dataclasses.replace(config, model=new_model_config)
    deeper = Transformer(new_config.model)
    old, state = model.state_dict(), deeper.state_dict()
    for name in state:
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            state[name] = old[f"layers.{sources[int(i)]}.{rest}"]
        else:
            state[name] = old[name]
    deeper.load_state_dict(state)
    return save_weights(new_config, deeper, out_dir)


EPILOG = """\
examples:
    python -m moe_train.tools.depth_upscale CHECKPOINT OUT_DIR [--drop 8]
    python train.py trainer.init_from=OUT_DIR ...           # continue pretraining, optimizer reset

Two copies of the model: the first loses its last m layers, the second its first m, and they are
stacked into 2 (n - m) layers (SOLAR: n = 32, m = 8 gives 48). Dense and MoE checkpoints alike; an
MoE model's dense/MoE layer pattern must come out the same as its config would place it. Multi-token
prediction modules, which follow the last layer, are kept as they are.
"""


def main(argv: list[str]) -> None:
    parser = tool_parser("moe_train.tools.depth_upscale", __doc__, EPILOG)
    parser.add_argument("checkpoint", help="a checkpoint or run directory")
    parser.add_argument("out_dir")
    parser.add_argument(
        "--drop", type=int, default=None, help="layers m dropped from each copy (default n/4)"
    )
    args = parser.parse_args(argv)
    with one_line_errors():
        out = depth_upscale(args.checkpoint, args.out_dir, args.drop)
    print(f"wrote {out}: continue training with trainer.init_from={out}")


if __name__ == "__main__":
    main(sys.argv[1:])
