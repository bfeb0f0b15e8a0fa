"""What sharding the dense weights costs: FSDP2 replicated (parallel.dp_shard=1, an all-reduce of
gradients) vs sharded (dp_shard=-1), at ep=1 and ep=2, the real Trainer on 2 gloo processes (CPU).

    python -m bench.sharding [--steps 20] [--warmup 3] [--rounds 3] [--eps 1,2] [overrides...]

Each layout trains mixtral_tiny (or any `model=`) from the same seed in fresh processes, `warmup`
steps and then `steps` timed ones; the layouts run interleaved, all once per round (the order
rotating), so a slow spell of a shared machine hits every layout alike. Reported per layout, the
median over rounds of:
- step_s: each rank's median step time (Trainer's step_time), the slower rank's; tokens_per_s the
  global batch over it; vs_replicated the median over rounds of the step time over that round's
  replicated one at the same ep (paired);
- state MiB per rank, from the tensors the rank holds after a step (DTensors' local shards, the
  larger rank's): parameters, gradients (read just before the optimizer step, after their
  reduction; the engine frees them after it) and AdamW's moments. Experts are sharded over their
  expert-data-parallel ranks (world / ep) in either layout: dp_shard only places dense weights;
- sent MiB per rank per step, by collective: every call, during the timed steps, of
  torch.distributed's all_gather_single / all_gather_into_tensor (FSDP2's weight gathers),
  reduce_scatter_single / reduce_scatter_tensor (its gradient reductions), all_reduce (HSDP's
  gradient reduction over replicas, the gradient norm, the step's metrics) and all_to_all_single
  (expert-parallel dispatch and combine), counted as a ring algorithm sends them from one rank of
  a group of n: (n - 1) x the input of an all-gather, (n - 1) x the output of a reduce-scatter,
  2 (n - 1) / n x the tensor of an all-reduce, and the rows an all-to-all sends to other ranks.
  What gloo puts on the wire (its own algorithms, any headers) may differ. Torch 2.13's FSDP2 calls
  dist.all_gather_single and dist.reduce_scatter_single through the torch.distributed module (and
  dist.all_reduce for HSDP), so wrapping the module's attributes sees them; the calls per step,
  also those on one-rank groups that send nothing, are in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import statistics
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import QUIET_RUN, print_table, write_json
from moe_train.parallel.spawn import run_ranks

LAYOUTS = {"replicated": 1, "sharded": -1}  # name: parallel.dp_shard
KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")
MIB = 2**20


def _ring_all_gather(n: int, output_tensor, input_tensor, **_) -> int:
    return (n - 1) * _nbytes(input_tensor)


def _ring_reduce_scatter(n: int, output, input, **_) -> int:
    return (n - 1) * _nbytes(output)


def _ring_all_reduce(n: int, tensor, **_) -> int:
    return 2 * (n - 1) * _nbytes(tensor) // n


def _all_to_all(n: int, output, input, output_split_sizes=None, input_split_sizes=None, group=None, **_):
    if not input_split_sizes:  # even splits
        return (n - 1) * _nbytes(input) // n
    me = dist.get_rank(group)
    row_bytes = _nbytes(input) // max(input.shape[0], 1)
    return sum(rows for rank, rows in enumerate(input_split_sizes) if rank != me) * row_bytes


# torch.distributed function: (kind, bytes this rank sends in a group of n)
COUNTED = {
    "all_gather_single": ("all_gather", _ring_all_gather),
    "all_gather_into_tensor": ("all_gather", _ring_all_gather),
    "reduce_scatter_single": ("reduce_scatter", _ring_reduce_scatter),
    "reduce_scatter_tensor": ("reduce_scatter", _ring_reduce_scatter),
    "all_reduce": ("all_reduce", _ring_all_reduce),
    "all_to_all_single": ("all_to_all", _all_to_all),
}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@contextlib.contextmanager
def count_collectives(sent: Counter, calls: Counter) -> Iterator[None]:
    """While open, every call of COUNTED through the torch.distributed module adds the bytes this
    rank sends to sent[kind] and one to calls[function]. The deprecated *_into_tensor / *_tensor
    forms call the *_single ones inside distributed_c10d, not through the module: counted once."""
    originals = {name: getattr(dist, name) for name in COUNTED}

    def counted(name, fn):
        kind, sent_bytes = COUNTED[name]
        signature = inspect.signature(fn)

        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            sent[kind] += sent_bytes(dist.get_world_size(bound.get("group")), **bound)
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, counted(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def worker(rank: int, overrides: list[str], warmup: int, steps: int, result_dir: str) -> None:
    from moe_train.parallel.topology import Topology
    from moe_train.tools.cli import retain_freed_memory
    from moe_train.tools.hydra_config import compose_config
    from moe_train.train.engine import tensor_bytes
    from moe_train.train.trainer import Trainer

    retain_freed_memory()  # as train.py does on a CPU
    config = compose_config(overrides)
    trainer = Trainer(config, Topology.setup(config.parallel, config.trainer.device))
    grad_bytes = []  # gradients live from backward to the optimizer step: read them just before it
    trainer.engine.register_step_pre_hook(
        lambda: grad_bytes.append(tensor_bytes(p.grad for p in trainer.model.parameters()))
    )
    for _ in range(warmup):
        trainer.train_step()
    sent, calls = Counter(), Counter()
    with count_collectives(sent, calls):
        timed = [trainer.train_step() for _ in range(steps)]
    result = {
        "step_s": statistics.median(m["step_time"] for m in timed),
        "tokens_per_step": trainer.config.trainer.global_batch_size * trainer.config.data.seq_len,
        "params_mib": tensor_bytes(trainer.model.parameters()) / MIB,
        "grads_mib": grad_bytes[-1] / MIB,
        "moments_mib": trainer.engine.optimizer_state_bytes()["moments"] / MIB,
        "sent_mib": {kind: sent[kind] / steps / MIB for kind in KINDS},
        "calls_per_step": {name: n / steps for name, n in sorted(calls.items())},
        "loss_last": timed[-1]["loss"],
        "model": trainer.config.model.name,
    }
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(result))


def run_layout(world: int, overrides: list[str], warmup: int, steps: int) -> dict:
    """One run of a layout on `world` fresh processes: the slower / larger rank's figures."""
    with tempfile.TemporaryDirectory() as tmp:
        run = [*QUIET_RUN, f"trainer.out_dir={tmp}/run", *overrides]
        run_ranks(world, worker, run, warmup, steps, tmp, result_dir=tmp)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    step_s = max(r["step_s"] for r in ranks)
    result = {
        "step_s": step_s,
        "tokens_per_s": ranks[0]["tokens_per_step"] / step_s,
        **{k: max(r[k] for r in ranks) for k in ("params_mib", "grads_mib", "moments_mib")},
        **{f"{kind}_mib": max(r["sent_mib"][kind] for r in ranks) for kind in KINDS},
        "loss_last": ranks[0]["loss_last"],
        "calls_per_step": ranks[0]["calls_per_step"],
        "model": ranks[0]["model"],
    }
    result["state_mib"] = result["params_mib"] + result["grads_mib"] + result["moments_mib"]
    result["sent_mib"] = max(sum(r["sent_mib"].values()) for r in ranks)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--eps", default="1,2")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args, overrides = parser.parse_known_args()
    layouts = [(ep, name) for ep in (int(e) for e in args.eps.split(",")) for name in LAYOUTS]
    runs: dict[tuple[int, str], list[dict]] = {layout: [] for layout in layouts}
    for r in range(args.rounds):
        for ep, name in layouts[r % len(layouts) :] + layouts[: r % len(layouts)]:
            layout = [f"parallel.ep={ep}", f"parallel.dp_shard={LAYOUTS[name]}", *overrides]
            runs[ep, name].append(run_layout(args.world, layout, args.warmup, args.steps))
            print(f"round {r + 1}/{args.rounds}: ep={ep} {name}: {runs[ep, name][-1]['step_s']:.3f} s/step")
    rows = []
    for (ep, name), results in runs.items():
        replicated = runs[ep, "replicated"]
        row = {"layout": name, "ep": ep, "dp_shard": LAYOUTS[name], "world": args.world}
        for key in results[0]:
            if key not in ("calls_per_step", "model"):
                row[key] = statistics.median(r[key] for r in results)
        row["vs_replicated"] = statistics.median(
            r["step_s"] / base["step_s"] for r, base in zip(results, replicated)
        )
        row["step_s_rounds"] = [r["step_s"] for r in results]
        row["calls_per_step"] = results[0]["calls_per_step"]
        rows.append(row)
    columns = ["layout", "ep", "step_s", "vs_replicated", "tokens_per_s", "params_mib", "grads_mib"]
    columns += ["moments_mib", "state_mib", "sent_mib", *(f"{kind}_mib" for kind in KINDS)]
    print(__doc__.strip().splitlines()[0])
    print_table(rows, columns)
    for row in rows:
        print(f"ep={row['ep']} {row['layout']}: calls per step {row['calls_per_step']}")
    model = next(iter(runs.values()))[0]["model"]
    write_json(
        f"sharding-{model}",
        {"model": model, "rows": rows, "steps": args.steps, "warmup": args.warmup, "overrides": overrides},
    )


if __name__ == "__main__":
    main()
