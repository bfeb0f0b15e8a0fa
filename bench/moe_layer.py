"""One MoE layer, forward and backward, at Mixtral-, DBRX- and DeepSeekMoE-like shapes.

    python -m bench.moe_layer            # CPU shapes scaled down by 8 in width; real widths on a GPU
    python -m bench.moe_layer --shapes deepseekmoe --contenders ours deepspeed   # a subset

Contenders, same shapes and (where the layout allows) the same weights, all in one run:
  ours          moe_train's MoE layer: one grouped product per weight (torch._grouped_mm, on CPUs and
                on Hopper GPUs in bf16)
  loop          the same layer with autograd's loop over experts forced (the reference path; the
                dispatch, permutation and combine are shared with ours)
  hf_mixtral    transformers' MixtralSparseMoeBlock, if transformers is installed; at the shape with
                shared experts our shared SwiGLU is added to its output (the block has none)
  deepspeed     deepspeed.moe.layer.MoE (ep_size=1 on a world-of-one gloo group), a ModuleList of
                SwiGLU experts holding our weights; drop_tokens=False, so its capacity is the
                largest expert count and every expert runs on a zero-padded (capacity, dim) block;
                no noise on the second expert (top2_2nd_expert_sampling=False), so it routes as we
                do; shared experts added as for hf_mixtral. Its TopKGate runs any k (top-1, top-2
                and a general top-k path), so every shape runs.
  megatron      megatron-core's MoELayer holding our router, expert and shared-expert weights
                (megatron_moe: dropless, aux and z losses on; TEGroupedMLP's grouped GEMM when
                transformer_engine is installed, else SequentialMLP's loop over experts). On a
                CPU its router's torch.cuda.current_device() calls are answered 'cpu' (OnCPU).
  dense_matmul  plain matrix products with the same FLOPs: the ceiling on this machine
On a CPU the process runs as our training does (moe_train.tools.cli.retain_freed_memory:
large blocks reused, not page-faulted in again each call), for every contender alike.
Contenders are timed in interleaved rounds (bench.common.time_interleaved); vs_ceiling is the
median over rounds of the contender's FLOP rate over dense_matmul's in the same round (q1 and q3
its quartiles), so a slow spell of a shared machine, which slows a whole round, cancels out;
time_vs_ours the median over rounds of the contender's time over ours in the same round (above 1:
slower than ours).
Before timing, each contender's output is compared with ours (same weights; fp32 on CPU, under bf16
autocast on a GPU) and the largest difference printed, so a contender that routes differently or
holds the weights otherwise shows.
FLOPs per layer call (forward + backward) = 6 * tokens * (top_k * 3 * dim * hidden
  + num_shared * 3 * dim * hidden + dim * num_experts): router, routed and shared experts; the same
  count for every contender (padding rows that a contender computes are not counted). The ceiling's
  rate is the FLOPs dense_matmul does (6 * tokens * (top_k + shared) * 3 * dim * hidden, no router)
  over its time.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import unittest.mock

import torch

from bench.common import print_table, time_interleaved, write_json
from moe_train.config import MoEConfig
from moe_train.model.moe import MoE
from moe_train.tools.cli import retain_freed_memory

SHAPES = {  # name: (dim, hidden, experts, top_k, shared) at real width
    "mixtral": (4096, 14336, 8, 2, 0),
    "dbrx": (6144, 10752, 16, 4, 0),
    "deepseekmoe": (2048, 1408, 64, 6, 2),
    "fine_grained_routed": (2048, 1408, 64, 6, 0),  # DeepSeekMoE's routed part: transformers' block runs it
}


FLOPS_FORMULA = "6*tokens*((top_k+shared)*3*dim*hidden + dim*experts)"
CEILING_FORMULA = "6*tokens*(top_k+shared)*3*dim*hidden"  # what dense_matmul does: no router


def layer_flops(tokens, dim, hidden, experts, top_k, shared) -> float:
    return 6.0 * tokens * ((top_k + shared) * 3 * dim * hidden + dim * experts)


def make_layer(dim, hidden, experts, top_k, shared, device) -> MoE:
    torch.manual_seed(0)
    config = MoEConfig(num_experts=experts, top_k=top_k, num_shared_experts=shared, renormalize=True)
    layer = MoE(config, dim, hidden).to(device)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=dim**-0.5)
    return layer


class LoopExperts(torch.nn.Module):
    """The same layer (same weights) with the loop over experts forced: the reference path."""

    def __init__(self, layer: MoE):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        experts = self.layer.experts
        experts.forward = experts._forward_loop
        try:
            return self.layer(x)
        finally:
            del experts.forward  # back to the class's forward


def hf_block(layer: MoE, dim, hidden, experts, top_k, device):
    """transformers' Mixtral block with our weights, or None (not installed / unknown layout)."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    config = MixtralConfig(
        hidden_size=dim, intermediate_size=hidden, num_local_experts=experts, num_experts_per_tok=top_k
    )
    block = MixtralSparseMoeBlock(config).to(device)
    w13, w2 = layer.experts.w13.detach(), layer.experts.w2.detach()
    w1, w3 = w13.chunk(2, dim=-1)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.gate.weight)
        ex = block.experts
        if hasattr(ex, "gate_up_proj"):  # transformers 5: fused (E, 2F, D) and (E, D, F)
            ex.gate_up_proj.copy_(w13.transpose(1, 2))
            ex.down_proj.copy_(w2.transpose(1, 2))
        else:  # transformers 4: a ModuleList of w1, w2, w3 Linears
            for e, expert in enumerate(ex):
                expert.w1.weight.copy_(w1[e].T)
                expert.w3.weight.copy_(w3[e].T)
                expert.w2.weight.copy_(w2[e].T)
    return block


class SwiGLUExpert(torch.nn.Module):
    """One expert in our layout (w1, w3: (dim, hidden); w2: (hidden, dim)), for DeepSpeed's ModuleList."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.empty(dim, hidden))
        self.w3 = torch.nn.Parameter(torch.empty(dim, hidden))
        self.w2 = torch.nn.Parameter(torch.empty(hidden, dim))

    def forward(self, x):  # (..., capacity, dim): DeepSpeed passes (ep, 1, capacity, dim)
        return (torch.nn.functional.silu(x @ self.w1) * (x @ self.w3)) @ self.w2


def _join_deepspeed() -> bool:
    try:
        import deepspeed
    except ImportError:
        print("deepspeed skipped: not installed")
        return False
    deepspeed.init_distributed(dist_backend="gloo")
    return True


def _join_megatron() -> bool:
    try:
        from megatron.core import parallel_state
    except ImportError:
        print("megatron skipped: megatron-core not installed")
        return False
    parallel_state.initialize_model_parallel()  # every model-parallel size 1
    return True


@contextlib.contextmanager
def world_of_one(wanted=("deepspeed", "megatron")):
    """A world-of-one gloo process group for the peers that read their groups from a library's
    global state: DeepSpeed's MoE layer (deepspeed.utils.groups) and megatron-core's
    (parallel_state). Yields the names of the wanted peers that can run; a peer not wanted is not
    imported (DeepSpeed's set-up builds a communication op the first time)."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    joins = {"deepspeed": _join_deepspeed, "megatron": _join_megatron}
    peers = {name for name in wanted if joins[name]()}
    try:
        yield peers
    finally:
        if "megatron" in peers:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


def deepspeed_moe(layer: MoE, dim, hidden, experts, top_k, device):
    """deepspeed.moe.layer.MoE with our router and expert weights, dropping no tokens."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    block = DeepSpeedMoE(
        dim,
        SwiGLUExpert(dim, hidden),
        num_experts=experts,
        ep_size=1,
        k=top_k,
        drop_tokens=False,  # capacity = the largest expert count: nothing dropped
        use_rts=False,
        min_capacity=0,
        top2_2nd_expert_sampling=False,  # no Gumbel noise on the second choice: plain top-2
    ).to(device)
    block.set_deepspeed_parallelism()
    with torch.no_grad():
        block.deepspeed_moe.gate.wg.weight.copy_(layer.router.gate.weight)
        for e, expert in enumerate(block.deepspeed_moe.experts.deepspeed_experts):
            w1, w3 = layer.experts.w13[e].chunk(2, dim=-1)
            for name, w in (("w1", w1), ("w3", w3), ("w2", layer.experts.w2[e])):
                getattr(expert, name).copy_(w)
    return block


def megatron_moe(
    layer: MoE,
    dim,
    hidden,
    experts,
    top_k,
    shared,
    device,
    aux_loss_coef=1e-2,
    z_loss_coef=1e-3,
    score_function="softmax",
    load_balancing="aux_loss",
    num_expert_groups=None,
    topk_groups=None,
    routed_scaling_factor=None,
):
    """megatron-core's MoELayer with our router, expert and shared-expert weights, dropless.

    Its best path where it can have it: with transformer_engine installed, TEGroupedMLP (one
    grouped GEMM) and TE's fused permutation and router; else SequentialMLP (a loop over experts;
    its other grouped path needs the grouped_gemm package, built for CUDA only). The alltoall
    dispatcher on a GPU (the one Megatron recommends with expert parallelism); on a CPU the
    allgather one, since alltoall creates CUDA streams when it is built. Top-k on the logits then
    softmax over the k, which is our softmax-top-k-renormalise; aux and z losses on, as ours
    computes both."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.spec_utils import build_module

    if not hasattr(moe_utils, "te_general_gemm"):
        # megatron-core 0.16 reads this name in its router whether or not transformer_engine
        # imported (it is only bound by that import): without TE it raises NameError
        moe_utils.te_general_gemm = None
    on_gpu = device.type == "cuda"
    config = TransformerConfig(
        num_layers=1,
        hidden_size=dim,
        num_attention_heads=1,
        ffn_hidden_size=hidden,
        moe_ffn_hidden_size=hidden,
        num_moe_experts=experts,
        moe_router_topk=top_k,
        moe_shared_expert_intermediate_size=shared * hidden or None,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",
        moe_grouped_gemm=moe_utils.HAVE_TE,  # with TE, its fused kernels too, as its own recipes
        moe_permute_fusion=moe_utils.HAVE_TE,
        moe_router_fusion=moe_utils.HAVE_TE,
        moe_router_score_function=score_function,  # sigmoid: top-k scores always renormalised
        moe_router_load_balancing_type=load_balancing,  # seq_aux_loss: per sequence (T, B, D)
        moe_router_num_groups=num_expert_groups,  # with group_topk: group-limited routing
        moe_router_group_topk=topk_groups,
        moe_router_topk_scaling_factor=routed_scaling_factor,
        moe_aux_loss_coeff=aux_loss_coef,
        moe_z_loss_coeff=z_loss_coef,
        # built on the CPU, then moved, and not initialised (on a GPU that needs Megatron's CUDA RNG
        # tracker set up): every weight is copied from ours below
        use_cpu_initialization=True,
        perform_initialization=False,
    )
    spec = get_moe_module_spec(
        use_te=moe_utils.HAVE_TE, num_experts=experts, moe_grouped_gemm=moe_utils.HAVE_TE
    )
    block = build_module(spec, config=config).to(device)
    with torch.no_grad():
        block.router.weight.copy_(layer.router.gate.weight)
        for e in range(experts):
            if hasattr(block.experts, "local_experts"):  # SequentialMLP: one MLP per expert
                mlp = block.experts.local_experts[e]
                fc1, fc2 = mlp.linear_fc1.weight, mlp.linear_fc2.weight
            else:  # TEGroupedMLP: TE's GroupedLinear keeps weight0, weight1, ... (out, in)
                fc1 = getattr(block.experts.linear_fc1, f"weight{e}")
                fc2 = getattr(block.experts.linear_fc2, f"weight{e}")
            fc1.copy_(layer.experts.w13[e].T)  # (2F, D): [gate; up], as our [w1 | w3] transposed
            fc2.copy_(layer.experts.w2[e].T)
        if shared:
            ffn = layer.shared_experts
            block.shared_experts.linear_fc1.weight.copy_(torch.cat([ffn.w1.weight, ffn.w3.weight]))
            block.shared_experts.linear_fc2.weight.copy_(ffn.w2.weight)
    return block if on_gpu else OnCPU(block)


class OnCPU(torch.nn.Module):
    """megatron-core's router puts its weight and loss tensors on torch.cuda.current_device(),
    which cannot be called without CUDA: on a CPU it is 'cpu' while the block runs forward."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        with unittest.mock.patch("torch.cuda.current_device", return_value="cpu"):
            return self.block(x)


class WithShared(torch.nn.Module):
    """A routed-only block plus our layer's shared experts (same weights): the DeepSeekMoE shape for
    blocks that have no shared experts."""

    def __init__(self, block, shared):
        super().__init__()
        self.block, self.shared = block, shared

    def forward(self, x):
        out = self.block(x)
        out = out[0] if isinstance(out, tuple) else out
        return out if self.shared is None else out + self.shared(x)


def max_difference(module, layer: MoE, x, autocast, shape=None) -> float:
    with torch.no_grad(), autocast():
        ours = layer(x)[0].float()
        out = module(x if shape is None else x.view(shape))
        out = out[0] if isinstance(out, tuple) else out
        return (out.reshape(ours.shape).float() - ours).abs().max().item()


def step_fn(module, x, autocast, shape=None):
    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        with autocast():
            out = module(x if shape is None else x.view(shape))
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    return run


def dense_swiglu_flops(rows, dim, hidden) -> float:
    return 6.0 * rows * 3 * dim * hidden


def dense_swiglu(rows, dim, hidden, device, dtype):
    """The ceiling: one dense SwiGLU over `rows` tokens, the FLOPs of the routed + shared experts
    (dense_swiglu_flops; the router's are not done, so they are not counted in its rate)."""
    a = torch.randn(rows, dim, device=device, dtype=dtype, requires_grad=True)
    w1, w3 = (torch.randn(dim, hidden, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    w2 = torch.randn(hidden, dim, device=device, dtype=dtype, requires_grad=True)

    def run():
        for t in (a, w1, w3, w2):
            t.grad = None
        ((torch.nn.functional.silu(a @ w1) * (a @ w3)) @ w2).float().sum().backward()

    return run


def bench_shape(
    name, dim, hidden, experts, top_k, shared, divisor, tokens, device, dtype, autocast, peers_available, args
) -> list[dict]:
    dim, hidden = dim // divisor, hidden // divisor
    flops = layer_flops(tokens, dim, hidden, experts, top_k, shared)
    layer = make_layer(dim, hidden, experts, top_k, shared, device)
    x = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    contenders = {"ours": step_fn(layer, x, autocast), "loop": step_fn(LoopExperts(layer), x, autocast)}
    peers = {}
    try:
        block = None
        if not args.contenders or "hf_mixtral" in args.contenders:
            block = hf_block(layer, dim, hidden, experts, top_k, device)
        if block is not None:
            peers["hf_mixtral"] = (WithShared(block, layer.shared_experts), (1, tokens, dim))
    except Exception as e:  # noqa: BLE001 - a transformers version with another layout
        print(f"hf_mixtral skipped at {name}: {type(e).__name__}: {e}")
    if "deepspeed" in peers_available:
        try:
            block = deepspeed_moe(layer, dim, hidden, experts, top_k, device)
            peers["deepspeed"] = (WithShared(block, layer.shared_experts), (1, tokens, dim))
        except Exception as e:  # noqa: BLE001 - a DeepSpeed version whose gate cannot run this k
            print(f"deepspeed skipped at {name} (top-{top_k}): {type(e).__name__}: {e}")
    if "megatron" in peers_available:  # sequence-first: (tokens, batch 1, dim)
        peers["megatron"] = (
            megatron_moe(layer, dim, hidden, experts, top_k, shared, device),
            (tokens, 1, dim),
        )
    for peer, (module, view) in peers.items():  # same weights: the same output, to fp32 or bf16 rounding
        difference = max_difference(module, layer, x, autocast, view)
        print(f"{name}: {peer} max |output - ours| = {difference:.2e} ({dtype or torch.float32})")
        contenders[peer] = step_fn(module, x, autocast, view)
    if args.contenders:
        contenders = {c: fn for c, fn in contenders.items() if c in args.contenders}
    dense_rows = tokens * (top_k + shared)
    contenders["dense_matmul"] = dense_swiglu(dense_rows, dim, hidden, device, dtype)
    times = time_interleaved(contenders, device, repeat=args.repeat)  # name -> seconds per round
    dense_flops = dense_swiglu_flops(dense_rows, dim, hidden)
    rows = []
    for contender, seconds in times.items():
        done = dense_flops if contender == "dense_matmul" else flops
        # vs_ceiling per round, against dense_matmul's rate in the same round (paired), then the median
        ratios = [done / t / (dense_flops / d) for t, d in zip(seconds, times["dense_matmul"])]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        vs_ours = [t / o for t, o in zip(seconds, times["ours"])] if "ours" in times else [float("nan")]
        rows.append(
            {
                "shape": name,
                "contender": contender,
                "dim": dim,
                "hidden": hidden,
                "experts": experts,
                "top_k": top_k,
                "shared": shared,
                "tokens": tokens,
                "ms": statistics.median(seconds) * 1e3,
                "tokens_per_s": tokens / statistics.median(seconds),
                "tflops": done / statistics.median(seconds) / 1e12,
                "vs_ceiling": statistics.median(ratios),
                "vs_ceiling_q1": q1,
                "vs_ceiling_q3": q3,
                "time_vs_ours": statistics.median(vs_ours),
            }
        )
    del contenders, peers, layer, x
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=None, help="tokens per layer call")
    parser.add_argument("--width-divisor", type=int, default=None, help="scale dim and hidden down")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--contenders", nargs="+", default=None, help="a subset (dense_matmul always runs)")
    parser.add_argument("--out-dir", default=None, help="the JSON's folder (default bench/results)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    if not on_gpu:
        retain_freed_memory()
    divisor = args.width_divisor or (1 if on_gpu else 8)
    tokens = args.tokens or (8192 if on_gpu else 4096)
    dtype = torch.bfloat16 if on_gpu else None
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else contextlib.nullcontext

    rows = []
    wanted = [p for p in ("deepspeed", "megatron") if not args.contenders or p in args.contenders]
    with world_of_one(wanted) as peers_available:
        for name in args.shapes:
            shape = SHAPES[name]
            rows += bench_shape(name, *shape, divisor, tokens, device, dtype, autocast, peers_available, args)
    print(
        f"FLOPs per layer call, every MoE contender: {FLOPS_FORMULA}; dense_matmul does {CEILING_FORMULA};"
        " vs_ceiling = FLOP rate / dense_matmul's FLOP rate in the same round, median (q1, q3) over rounds;"
        " time_vs_ours = time / ours in the same round, median over rounds"
    )
    print_table(
        rows,
        [
            "shape",
            "contender",
            "dim",
            "hidden",
            "experts",
            "top_k",
            "shared",
            "tokens",
            "ms",
            "tokens_per_s",
            "tflops",
            "vs_ceiling",
            "vs_ceiling_q1",
            "vs_ceiling_q3",
            "time_vs_ours",
        ],
    )
    write_json(
        "moe_layer",
        {"rows": rows, "flops_formula": FLOPS_FORMULA, "ceiling_formula": CEILING_FORMULA},
        out_dir=args.out_dir,
    )


if __name__ == "__main__":
    main()
