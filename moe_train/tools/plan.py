"""The memory a layout (pipeline stages, expert parallelism, FSDP's shard groups) needs on each
GPU, for both engines, and the layout with the fewest GPUs that fits; --dry-run builds the real
shards of the heaviest rank on a fake world of that size to check the model states."""

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
from moe_train.parallel.pipeline import check_micro_batches
from moe_train.tools.cli import one_line_errors, tool_parser
from moe_train.tools.hydra_config import compose_config
from moe_train.tools.memory import (
    GIB,
    Bytes,
    Layout,
    ModelShapes,
    heaviest_rank,
    micro_batches,
    native_bytes,
    native_ranks,
    zero_bytes,
)
from moe_train.train.engine import tensor_bytes

EPILOG = """examples:
  python -m moe_train.tools.plan model=deepseek_v3 --gpus 256 data.seq_len=4096 \\
      trainer.micro_batch_size=1 trainer.activation_checkpointing=true parallel.ep=64
  python -m moe_train.tools.plan model=deepseek_v3 --gpus 2048 parallel.pp=16 parallel.ep=64 \\
      trainer.global_batch_size=15360 trainer.micro_batch_size=1 data.seq_len=4096
  python -m moe_train.tools.plan model=mixtral_8x7b --gpus 16 --dry-run --json plan.json
Bytes are per GPU at the peak of a step (with pipeline stages, the heaviest pipeline rank's); the
layout of --gpus comes from parallel.pp, parallel.ep and parallel.dp_shard (-1: all GPUs of a
stage), the schedule from parallel.pp_schedule; the search tries powers of two up to --max-gpus."""

ENGINES = {"native": native_bytes, "deepspeed": zero_bytes}
GPUS_PER_NODE = 8


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def runs(config: Config, layout: Layout) -> bool:
    """Whether training can run the layout: the global batch split evenly into micro-batches over
    a stage's GPUs; with a pipeline at most one stage per layer and the micro-batches per step its
    schedule needs (pipeline.check_micro_batches)."""
    p, t = config.parallel, config.trainer
    if t.global_batch_size % ((t.micro_batch_size or 1) * layout.stage_gpus):
        return False
    if layout.pp == 1:
        return True
    if layout.pp * p.pp_stages_per_rank > config.model.num_layers:
        return False
    try:
        check_micro_batches(dataclasses.replace(p, pp=layout.pp), micro_batches(config, layout))
    except ConfigError:
        return False
    return True


def layouts(gpus: int, config: Config, engine: str) -> Iterator[Layout]:
    """Every layout of `gpus`: pp (native only) dividing the GPUs, that training can run (`runs`);
    ep dividing a stage's GPUs and the experts; dp_shard (native only) dividing a stage's GPUs."""
    num_experts = config.model.moe.num_experts
    for pp in divisors(gpus) if engine == "native" else [1]:
        n = gpus // pp
        if not runs(config, Layout(gpus, 1, n, pp)):
            continue
        for ep in divisors(n) if num_experts else [1]:
            if num_experts % ep == 0:
                for dp_shard in divisors(n) if engine == "native" and n > 1 else [n]:
                    yield Layout(gpus, ep, dp_shard, pp)


def cross_node_gathers(layout: Layout, engine: str, num_experts: int) -> bool:
    """Whether FSDP all-gathers weights from other nodes (of GPUS_PER_NODE GPUs) every
    micro-batch: the dense weights' shard group (dp_shard consecutive GPUs) spans nodes, or the
    experts' (their edp GPUs, ep apart: spread over all of a stage's GPUs) does. ZeRO-1/2 gathers
    no weights in the step."""
    if engine != "native":
        return False
    edp = layout.stage_gpus // layout.ep
    experts_cross = num_experts > 0 and edp > 1 and layout.stage_gpus > GPUS_PER_NODE
    return layout.dp_shard > GPUS_PER_NODE or experts_cross


def fewest_gpus(shapes: ModelShapes, engine: str, bf16: bool, memory: int, max_gpus: int):
    """The layout with the fewest GPUs (powers of two) that fits; among those, in order: no
    FSDP all-gathers across nodes (`cross_node_gathers`: the heaviest traffic, once per unit and
    micro-batch, which pipeline stages avoid by keeping a stage's GPUs on one node), the fewest
    pipeline stages (each adds bubble, and torch's schedules keep a stage's weights gathered and
    its gradients unsharded through the step), the most room, the smaller ep. The pipeline's
    sends and the experts' all-to-all are not weighed. None if none up to max_gpus fits."""
    config, experts = shapes.config, shapes.config.model.moe.num_experts
    gpus = 1
    while gpus <= max_gpus:
        fits = [
            (cross_node_gathers(layout, engine, experts), layout.pp, b.total, layout.ep, layout, b)
            for layout in layouts(gpus, config, engine)
            if (b := ENGINES[engine](shapes, layout, bf16)).total <= memory
        ]
        if fits:
            return min(fits, key=lambda f: f[:4])[4:]
        gpus *= 2
    return None


@contextlib.contextmanager
def fake_world(gpus: int, rank: int = 0) -> Iterator[None]:
    """Rank `rank` of a world of `gpus` processes that exchange nothing (torch's fake process group)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    os.environ.update(WORLD_SIZE=str(gpus), RANK=str(rank), LOCAL_RANK="0")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=gpus)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def layout_config(config: Config, layout: Layout) -> Config:
    """config with the layout's degrees (parallel.pp_layers kept where it lists its stages)."""
    p = config.parallel
    stages = layout.pp * p.pp_stages_per_rank
    pp_layers = p.pp_layers if layout.pp > 1 and len(p.pp_layers or []) == stages else None
    parallel = dataclasses.replace(
        p, ep=layout.ep, dp_shard=layout.dp_shard, pp=layout.pp, pp_layers=pp_layers
    )
    engine = dataclasses.replace(config.engine, name="native")
    return dataclasses.replace(config, parallel=parallel, engine=engine)


def dry_run(config: Config, layout: Layout, bf16: bool, pp_rank: int = 0) -> dict:
    """The model of the first GPU of pipeline rank `pp_rank` (rank 0 without pp) as training
    builds it (meta device, its stages kept, expert parallelism, FSDP2) on a fake world of
    layout.gpus, and Adam's state made by one optimizer step on it: the bytes of every tensor
    it would hold, and the host memory its start-up needs (its shards, plus the largest tensor it
    initialises whole: one expert of a stacked tensor, any other tensor entire)."""
    from moe_train.parallel.parallelize import parallelize
    from moe_train.parallel.topology import Topology

    config = layout_config(config, layout)
    with fake_world(layout.gpus, pp_rank * layout.stage_gpus):
        topology = Topology.setup(config.parallel, "cpu")
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
        "rank": pp_rank * layout.stage_gpus,
        "pp_rank": pp_rank,
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
    table = [["engine / layout", "gpus", "pp", "ep", "dp_shard", *[f"{k} GiB" for k in kinds], "fits"]]
    notes = []
    for what, layout, b in rows:
        if b is None:
            notes.append(f"{what}: no layout fits" if "fewest" in what else f"{what}: runs pp=1 only")
            continue
        cells = [what, *(str(getattr(layout, k)) for k in ("gpus", "pp", "ep", "dp_shard"))]
        table.append(cells + [gib(getattr(b, k)) for k in kinds] + ["yes" if b.total <= memory else "no"])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
            )
        )
    for note in notes:
        print(note)


def asked_layout(config: Config, gpus: int) -> Layout:
    """The layout of --gpus and parallel.*, checked: one line naming what cannot be."""
    p, model = config.parallel, config.model
    Layout(gpus, 1, 1, p.pp).check(0, model.num_layers, p.pp_stages_per_rank)  # pp first
    stage_gpus = gpus // p.pp
    layout = Layout(gpus, p.ep, stage_gpus if p.dp_shard == -1 else p.dp_shard, p.pp)
    layout.check(model.moe.num_experts, model.num_layers, p.pp_stages_per_rank)
    from moe_train.train.trainer import batch_layout  # the trainer's own refusal, word for word

    batch_layout(config.trainer, stage_gpus)
    if p.pp > 1:
        check_micro_batches(p, micro_batches(config, layout))
    return layout


def main(argv: list[str]) -> None:
    parser = tool_parser("moe_train.tools.plan", __doc__, EPILOG)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of the layout to count")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU (GB, 10^9)")
    parser.add_argument("--max-gpus", type=int, default=4096, help="the largest world the search tries")
    parser.add_argument("--dry-run", action="store_true", help="build the heaviest rank's shards, fake world")
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
    layout = asked_layout(config, gpus)
    engines = ENGINES if layout.pp == 1 else {"native": native_bytes}
    asked = {engine: count(shapes, layout, bf16) for engine, count in engines.items()}
    best = {engine: fewest_gpus(shapes, engine, bf16, memory, max_gpus) for engine in ENGINES}
    rows = [(f"{engine} (asked)", layout, asked.get(engine)) for engine in ENGINES]
    rows += [(f"{engine} (fewest GPUs)", *(found or (layout, None))) for engine, found in best.items()]
    p = config.parallel
    pipeline = (
        f"; pipeline {p.pp_schedule}, {micro_batches(config, layout)} micro-batches per step"
        if layout.pp > 1
        else ""
    )
    print(
        f"{config.model.name}: {shapes.numel(False) / 1e9:.2f}B dense + {shapes.numel(True) / 1e9:.2f}B "
        f"routed-expert parameters; seq {config.data.seq_len}, micro-batch "
        f"{config.trainer.micro_batch_size or 1}, activation checkpointing "
        f"{'on' if config.trainer.activation_checkpointing else 'off'}, {'bf16' if bf16 else 'fp32'}"
        f"{pipeline}; per GPU of {memory / 1e9:g} GB"
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

        def totals_at(gpus: int) -> list[int]:
            return [
                count(shapes, other, bf16).total
                for engine, count in ENGINES.items()
                for other in layouts(gpus, config, engine)
            ]

        top = 2 ** (max_gpus.bit_length() - 1)
        totals = totals_at(top)
        while not totals and top > 1:  # the most GPUs a run of this batch can use
            top //= 2
            totals = totals_at(top)
        least = min(totals)
        raise ConfigError(
            f"--gpu-memory-gb={memory / 1e9:g}: no layout of up to {max_gpus} GPUs fits; the smallest "
            f"memory that fits is {least / 1e9:.1f} GB (at {top} GPUs), or try a larger --max-gpus"
        )
    if dry:
        pp_rank = heaviest_rank(shapes, layout, bf16)
        report["dry_run"] = d = dry_run(config, layout, bf16, pp_rank)
        counted = native_ranks(shapes, layout, bf16)[pp_rank]
        where = f" (pipeline rank {pp_rank}, the heaviest)" if layout.pp > 1 else ""
        print(
            f"dry run, rank {d['rank']} of {gpus}{where}: weights {gib(d['weights'])} GiB, gradients "
            f"{gib(d['gradients'])}, optimizer {gib(d['optimizer'])} (the plan: {gib(counted.weights)}, "
            f"{gib(counted.gradients)}, {gib(counted.optimizer)}); start-up host memory "
            f"{gib(d['startup_host_memory'])} GiB"
        )
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
