"""Expert-parallel scaling of one MoE layer, forward and backward, on CPU processes (gloo).

    python -m bench.expert_parallel [--shape mixtral|deepseekmoe] [--tokens 2048] [--eps 1 2 4]
                                    [--topk-groups 1]

Shapes (bench.moe_layer's, width / 8): mixtral, 8 experts top-2; deepseekmoe, 64 fine-grained
experts top-6 plus 2 shared. Each rank routes its own `tokens`; at ep > 1 every layer call moves
rows with all_to_all_single; with --topk-groups M, group-limited routing over ep groups (one per
rank) at every ep > M. Reports global tokens/s, rows sent per token (a token goes once to each
rank holding any of its experts: between 1 and min(top_k, ep)), bytes each rank sends to other
ranks per call (forward + backward: counts, assignments, router weights, tokens, expert outputs and
their gradients) and the share of the call spent waiting for all-to-all. On a 2-core machine ep=4
oversubscribes the cores: compare the communication columns, not speed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import print_table, write_json
from moe_train.parallel.spawn import run_ranks

SHAPES = {  # bench.moe_layer's, width / 8
    "mixtral": dict(dim=512, hidden=1792, experts=8, top_k=2, shared=0),
    "deepseekmoe": dict(dim=256, hidden=176, experts=64, top_k=6, shared=2),
}


def rank_main(
    rank: int, ep: int, shape: dict, topk_groups: int, tokens: int, repeat: int, result_dir: str
) -> None:
    import torch.distributed as dist

    import moe_train.parallel.expert_parallel as expert_parallel
    from moe_train.config import MoEConfig, ParallelConfig
    from moe_train.model.moe import MoE
    from moe_train.parallel.topology import Topology
    from moe_train.tools.cli import retain_freed_memory

    retain_freed_memory()  # as train.py does on a CPU
    topology = Topology.setup(ParallelConfig(ep=ep), "cpu")
    torch.manual_seed(0)
    groups = dict(num_expert_groups=ep, topk_groups=topk_groups) if ep > topk_groups > 0 else {}
    config = MoEConfig(
        num_experts=shape["experts"], top_k=shape["top_k"], num_shared_experts=shape["shared"], **groups
    )
    layer = MoE(config, shape["dim"], shape["hidden"])
    expert_parallel.apply_expert_parallel(layer, topology)
    torch.manual_seed(rank)
    x = torch.randn(tokens, shape["dim"], requires_grad=True)

    stats = {"seconds": 0.0, "bytes": 0, "rows": 0}
    # every exchange is one _all_to_all: count what it sends to other ranks and time it
    all_to_all = expert_parallel._all_to_all

    def counted(t, output_splits, input_splits, group, what):
        me = dist.get_rank(group)
        row_bytes = t[0].numel() * t.element_size() if t.shape[0] else 0
        stats["bytes"] += sum(n for r, n in enumerate(input_splits) if r != me) * row_bytes
        stats["rows"] += sum(input_splits) if what == "tokens" else 0
        start = time.perf_counter()
        out = all_to_all(t, output_splits, input_splits, group, what)
        stats["seconds"] += time.perf_counter() - start
        return out

    expert_parallel._all_to_all = counted

    def step():
        layer.zero_grad(set_to_none=True)
        out, _ = layer(x)
        out.sum().backward()

    for _ in range(2):
        step()
    stats.update(seconds=0.0, bytes=0, rows=0)
    if topology.distributed:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(repeat):
        step()
    elapsed = (time.perf_counter() - start) / repeat
    result = {
        "step_s": elapsed,
        "a2a_s": stats["seconds"] / repeat,
        "bytes": stats["bytes"] / repeat,
        "rows_per_token": stats["rows"] / repeat / tokens if topology.distributed else 0.0,
    }
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=list(SHAPES), default="mixtral")
    parser.add_argument(
        "--topk-groups", type=int, default=0, help="group-limited routing, one group per rank"
    )
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--eps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    rows = []
    for ep in args.eps:
        with tempfile.TemporaryDirectory() as result_dir:
            run_ranks(
                ep, rank_main, ep, shape, args.topk_groups, args.tokens, args.repeat, result_dir,
                result_dir=result_dir,
            )  # fmt: skip
            ranks = [json.loads(Path(result_dir, f"rank{r}.json").read_text()) for r in range(ep)]
        step_s = max(r["step_s"] for r in ranks)
        rows.append(
            {
                "ep": ep,
                "processes": ep,
                "tokens_per_rank": args.tokens,
                "step_ms": step_s * 1e3,
                "tokens_per_s": ep * args.tokens / step_s,
                "rows_sent_per_token": sum(r["rows_per_token"] for r in ranks) / ep,
                "sent_MB_per_rank": sum(r["bytes"] for r in ranks) / ep / 1e6,
                "a2a_share": sum(r["a2a_s"] / r["step_s"] for r in ranks) / ep,
            }
        )
    print(__doc__.strip().splitlines()[0])
    print_table(rows, list(rows[0]))
    name = f"expert_parallel-{args.shape}" + (f"-topk_groups{args.topk_groups}" if args.topk_groups else "")
    write_json(name, {"shape": shape, "topk_groups": args.topk_groups, "rows": rows})


if __name__ == "__main__":
    main()
