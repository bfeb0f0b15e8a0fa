"""Sparse upcycling: turn a dense checkpoint into an MoE one whose experts start from the dense FFN,
so that MoE training continues from what the dense model learned instead of from scratch."""

from __future__ import annotations

import dataclasses
import sys

import torch

from moe_train.config import ConfigError, MoEConfig
from moe_train.model import Transformer
from moe_train.model.transformer import block_prefixes
from moe_train.tools.cli import one_line_errors, tool_parser
from moe_train.train.checkpoint import load_model, save_weights


def upcycle(
    checkpoint: str,
    out_dir: str,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
    renormalize: bool = True,
    aux_loss_coef: float = 0.01,
    z_loss_coef: float = 0.001,
    router_std: float = 0.02,
    seed: int = 0,
):
    """Granularity 1 (Komatsuzaki et al. 2022): every expert is a copy of the layer's dense SwiGLU, the
    router starts small and random; with renormalised top-k weights summing to 1, the MoE model
    computes exactly the dense one at step 0. Granularity m > 1 (fine-grained, as DeepSeekMoE /
    Qwen1.5-MoE upcycle): expert e is hidden slice e mod m, its down projection scaled by m. The dense
    output is the sum of the m slices, the MoE output m x the weighted mean of the k chosen ones:
    equal only when those are the m distinct slices at equal weights, so it starts close, not equal."""
    config, dense = load_model(checkpoint)
    model_config = config.model
    if model_config.moe.num_experts:
        raise ConfigError(f"{checkpoint} is already an MoE model ({model_config.moe.num_experts} experts)")
    if granularity < 1 or model_config.ffn_hidden_dim % granularity:
        raise ConfigError(
            f"--granularity={granularity} must divide the dense FFN's hidden size "
            f"{model_config.ffn_hidden_dim}"
        )
    if num_experts < 1:
        raise ConfigError(f"--num-experts={num_experts} must be >= 1")
    if not router_std >= 0 or router_std == float("inf"):  # NaN fails the first test
        raise ConfigError(f"--router-std={router_std} must be a finite number >= 0")
    if num_experts % granularity:
        raise ConfigError(f"--num-experts={num_experts} must be a multiple of --granularity={granularity}")
    moe = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        expert_hidden_dim=model_config.ffn_hidden_dim // granularity,
        renormalize=renormalize,
        aux_loss_coef=aux_loss_coef,
        z_loss_coef=z_loss_coef,
    )
    # a name of its own: runs default to runs/<model name>, where the dense run's checkpoints are
    name = f"{model_config.name}_{num_experts}x_top{top_k}"
    new_config = dataclasses.replace(config, model=dataclasses.replace(model_config, name=name, moe=moe))
    torch.manual_seed(seed)
    moe_model = Transformer(new_config.model)
    dense_state, state = dense.state_dict(), moe_model.state_dict()
    hidden = moe.expert_hidden_dim
    for block in block_prefixes(model_config):  # multi-token prediction's blocks too
        ffn = block + "ffn."
        w1, w3, w2 = (dense_state[ffn + f"{n}.weight"] for n in ("w1", "w3", "w2"))  # (F, D), (F, D), (D, F)
        for e in range(num_experts):
            part = slice((e % granularity) * hidden, (e % granularity + 1) * hidden)
            state[ffn + "experts.w13"][e] = torch.cat([w1[part].T, w3[part].T], dim=1)  # (D, 2F)
            state[ffn + "experts.w2"][e] = w2[:, part].T * granularity
        torch.nn.init.normal_(state[ffn + "router.gate.weight"], std=router_std)
    for name, tensor in dense_state.items():  # attention, norms, embeddings: unchanged
        if ".ffn." not in name:
            state[name].copy_(tensor)
    moe_model.load_state_dict(state)
    return save_weights(new_config, moe_model, out_dir)


EPILOG = """\
examples:
    python -m moe_train.tools.upcycle DENSE_CHECKPOINT OUT_DIR --num-experts 8 --top-k 2
    python -m moe_train.tools.upcycle DENSE_CHECKPOINT OUT_DIR --num-experts 16 --top-k 4 --granularity 2
    python train.py trainer.init_from=OUT_DIR ...           # training continues, optimizer reset

Granularity 1 (Komatsuzaki et al. 2022): every expert is a copy of the layer's dense SwiGLU and the
router starts small and random; with top-k weights renormalised the upcycled model computes exactly
the dense model at step 0. Granularity m > 1 (fine-grained experts, as in DeepSeekMoE / Qwen1.5-MoE
upcycling): the dense hidden units are cut into m slices, expert e is slice e mod m; the upcycled
model starts close to the dense one, not equal.
"""


def main(argv: list[str]) -> None:
    parser = tool_parser("moe_train.tools.upcycle", __doc__, EPILOG)
    parser.add_argument("checkpoint", help="a dense checkpoint or run directory")
    parser.add_argument("out_dir")
    parser.add_argument("--num-experts", type=int, required=True)
    parser.add_argument("--top-k", type=int, required=True)
    parser.add_argument("--granularity", type=int, default=1, help="slices of the dense FFN per expert group")
    parser.add_argument("--no-renormalize", dest="renormalize", action="store_false")
    parser.add_argument("--aux-loss-coef", type=float, default=0.01)
    parser.add_argument("--z-loss-coef", type=float, default=0.001)
    parser.add_argument("--router-std", type=float, default=0.02)
    args = parser.parse_args(argv)
    with one_line_errors():
        out = upcycle(
            args.checkpoint,
            args.out_dir,
            args.num_experts,
            args.top_k,
            args.granularity,
            args.renormalize,
            args.aux_loss_coef,
            args.z_loss_coef,
            args.router_std,
        )
    print(f"wrote {out}: continue training with trainer.init_from={out}")


if __name__ == "__main__":
    main(sys.argv[1:])
