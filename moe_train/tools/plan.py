"""The memory a layout needs on each GPU, for both engines, and the layout with the fewest GPUs
that fits; --dry-run builds one rank's real shards on a fake world of that size to check the
model states."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from moe_train.config import Config, ConfigError
from moe_train.data.loader import tokenizer_vocab_size
from moe_train.model import Transformer
from moe_train.model.moe import is_expert_param
from moe_train.tools.cli import one_line_errors, tool_parser
from moe_train.tools.hydra_config import compose_config
from moe_train.tools.memory import GIB, Bytes, Layout, ModelShapes, native_bytes, zero_bytes
from moe_train.train.engine import tensor_bytes

EPILOG = """examples:
  python -m moe_train.tools.plan model=deepseek_v3 --gpus 256 data.seq_len=4096 \\
      trainer.micro_batch_size=1 trainer.activation_checkpointing=true parallel.ep=64
  python -m moe_train.tools.plan model=mixtral_8x7b --gpus 16 --dry-run --json plan.json
Bytes are per GPU at the peak of a step; the layout of --gpus comes from parallel.ep and
parallel.dp_shard (-1: all GPUs); the search tries powers of two up to --max-gpus."""

ENGINES = {"native": native_bytes, "deepspeed": zero_bytes}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(gpus: int, num_experts: int, engine: str) -> Iterator[Layout]:
    """Every layout of `gpus`: ep dividing the GPUs and the experts; dp_shard (native only)."""
    for ep in divisors(gpus) if num_experts else [1]:
        if num_experts % max(ep, 1) == 0:
            for dp_shard in divisors(gpus) if engine == "native" and gpus > 1 else [gpus]:
                yield Layout(gpus, ep, dp_shard)


def fewest_gpus(shapes: ModelShapes, engine: str, bf16: bool, memory: int, max_gpus: int):
    """The layout with the fewest GPUs (powers of two) that fits, the one with the most room among
    those; None if none up to max_gpus fits."""
    gpus = 1
    while gpus <= max_gpus:
        fits = [
            (b.total, layout, b)
            for layout in layouts(gpus, shapes.config.model.moe.num_experts, engine)
            if (b := ENGINES[engine](shapes, layout, bf16)).total <= memory
        ]
        if fits:
            _, layout, found = min(fits, key=lambda f: (f[0], f[1].ep))
            return layout, found
        gpus *= 2
    return None


@contextlib.contextmanager
def fake_world(gpus: int) -> Iterator[None]:
    """Rank 0 of a world of `gpus` processes that exchange nothing (torch's fake process group)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    os.environ.update(WORLD_SIZE=str(gpus), RANK="0", LOCAL_RANK="0")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def dry_run(config: Config, layout: Layout, bf16: bool) -> dict:
    """Rank 0's model as training builds it (meta device, expert parallelism, FSDP2) on a fake world
    of layout.gpus, and Adam's state made by one optimizer step on it: the bytes of every tensor
    it would hold, and the host memory its start-up needs (its shards, plus the largest tensor it
    initialises whole: one expert of a stacked tensor, any other tensor entire)."""
    from moe_train.parallel.parallelize import parallelize
    from moe_train.parallel.topology import Topology

    parallel = dataclasses.replace(config.parallel, ep=layout.ep, dp_shard=layout.dp_shard)
    config = dataclasses.replace(
        config, parallel=parallel, engine=dataclasses.replace(config.engine, name="native")
    )
    with fake_world(layout.gpus):
        topology = Topology.setup(parallel, "cpu")
        with torch.device("meta"):
            model = Transformer(config.model)
        if topology.distributed:
            parallelize(model, config, topology, bf16)
        optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()

        tensors = {name: tensor_bytes([p]) for name, p in model.named_parameters()}
        moments = tensor_bytes(v for state in optimizer.state.values() for v in state.values())
        largest = max(
            4 * (p.shape[1:].numel() if is_expert_param(name) else p.shape.numel())
            for name, p in model.named_parameters()
        )
    weights = sum(tensors.values())
    return {
        "weights": weights,
        "gradients": weights,
        "optimizer": moments,
        "model_states": 2 * weights + moments,
        "startup_host_memory": weights + largest,
        "largest_tensors": dict(sorted(tensors.items(), key=lambda kv: -kv[1])[:5]),
    }


def gib(n: int) -> str:
    return f"{n / GIB:,.1f}"


def print_table(rows: list[tuple[str, Layout, Bytes | None]], memory: int) -> None:
    kinds = ["weights", "master_weights", "gradients", "optimizer", "buffers", "activations", "total"]
    header = ["engine / layout", "gpus", "ep", "dp_shard", *[f"{k} GiB" for k in kinds], "fits"]
    print("  ".join(header))
    for what, layout, b in rows:
        if b is None:
            print(f"{what}: no layout fits")
            continue
        cells = [what, str(layout.gpus), str(layout.ep), str(layout.dp_shard)]
        cells += [gib(getattr(b, k)) for k in kinds] + ["yes" if b.total <= memory else "no"]
        print("  ".join(cells))


def main(argv: list[str]) -> None:
    parser = tool_parser("moe_train.tools.plan", __doc__, EPILOG)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of the layout to count")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU (GB, 10^9)")
    parser.add_argument("--max-gpus", type=int, default=4096, help="the largest world the search tries")
    parser.add_argument("--dry-run", action="store_true", help="build rank 0's shards on a fake world")
    parser.add_argument("--json", type=Path, help="write everything printed as JSON here")
    args, overrides = parser.parse_known_args(argv)
    with one_line_errors():
        if args.gpus < 1 or args.max_gpus < 1:
            raise ConfigError(f"--gpus={args.gpus} and --max-gpus={args.max_gpus} must be >= 1")
        if not 0 < args.gpu_memory_gb < float("inf"):
            raise ConfigError(f"--gpu-memory-gb={args.gpu_memory_gb} must be a finite number > 0")
        config = compose_config(overrides)
        if config.model.vocab_size is None:
            config = dataclasses.replace(
                config, model=dataclasses.replace(config.model, vocab_size=tokenizer_vocab_size(config))
            )
        report = plan(config, args.gpus, int(args.gpu_memory_gb * 1e9), args.max_gpus, args.dry_run)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))


def plan(config: Config, gpus: int, memory: int, max_gpus: int, dry: bool) -> dict:
    bf16 = config.trainer.precision != "fp32"
    shapes = ModelShapes(config)
    p = config.parallel
    layout = Layout(gpus, p.ep, gpus if p.dp_shard == -1 else p.dp_shard)
    layout.check(config.model.moe.num_experts)
    asked = {engine: count(shapes, layout, bf16) for engine, count in ENGINES.items()}
    best = {engine: fewest_gpus(shapes, engine, bf16, memory, max_gpus) for engine in ENGINES}
    rows = [(f"{engine} (asked)", layout, b) for engine, b in asked.items()]
    rows += [(f"{engine} (fewest GPUs)", *(found or (layout, None))) for engine, found in best.items()]
    print(
        f"{config.model.name}: {shapes.numel(False) / 1e9:.2f}B dense + {shapes.numel(True) / 1e9:.2f}B "
        f"routed-expert parameters; seq {config.data.seq_len}, micro-batch "
        f"{config.trainer.micro_batch_size or 1}, activation checkpointing "
        f"{'on' if config.trainer.activation_checkpointing else 'off'}, {'bf16' if bf16 else 'fp32'}; "
        f"per GPU of {memory / 1e9:g} GB"
    )
    print_table(rows, memory)
    report = {
        "model": config.model.name,
        "asked": {e: {"layout": dataclasses.asdict(layout), **b.as_dict()} for e, b in asked.items()},
        "fewest_gpus": {
            e: ({"layout": dataclasses.asdict(f[0]), **f[1].as_dict()} if f else None)
            for e, f in best.items()
        },
    }
    if best["native"] is None and best["deepspeed"] is None:
        top = 2 ** (max_gpus.bit_length() - 1)
        least = min(
            count(shapes, other, bf16).total
            for engine, count in ENGINES.items()
            for other in layouts(top, config.model.moe.num_experts, engine)
        )
        raise ConfigError(
            f"--gpu-memory-gb={memory / 1e9:g}: no layout of up to {max_gpus} GPUs fits; the smallest "
            f"memory that fits is {least / 1e9:.1f} GB (at {top} GPUs), or try a larger --max-gpus"
        )
    if dry:
        report["dry_run"] = dry_run(config, layout, bf16)
        d, counted = report["dry_run"], asked["native"]
        print(
            f"dry run, rank 0 of {gpus}: weights {gib(d['weights'])} GiB, gradients {gib(d['gradients'])}, "
            f"optimizer {gib(d['optimizer'])} (the plan: {gib(counted.weights)}, {gib(counted.gradients)}, "
            f"{gib(counted.optimizer)}); start-up host memory {gib(d['startup_host_memory'])} GiB"
        )
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
