"""The pipeline bubble of torch's schedules, measured on CPU processes beside its theory.

    python -m bench.pipeline_bubble [--pps 1 2 4] [--micro-batches 4 8 16] [--ms 30]
                                    [--schedules 1F1B GPipe ...] [--work sleep|matmul]

Each rank runs its stages through torch.distributed.pipelining (the stages and schedules
moe_train uses, gloo sends between processes). A stage's work per micro-batch is fixed: forward F,
backward for the input B and for the weights W, each `--ms` milliseconds (B + W = 2F, as for a
transformer block), split over a rank's stages when it holds several. With `--work sleep` (the
default) the work is a sleep, so the step time is the schedule's alone even when the processes
outnumber the cores (4 on this 2-core machine); `--work matmul` does the work as matrix products
instead, which needs a core per process to mean anything.

The bubble is the share of the step a rank waits: 1 - m (F + B + W) / step time. Theory
(Narayanan et al. 2021, sec. 2.2): GPipe and 1F1B (p - 1) / (m + p - 1); interleaved with v stages
per rank (p - 1) / (v m + p - 1), and so LoopedBFS, breadth-first over the same looped stages
(Lamy-Poirier 2023). The zero-bubble schedules (Qi et al. 2024) fill the bubble with the weight gradients:
they are measured only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import print_table, write_json
from moe_train.config.training import PIPELINE_SCHEDULES, SINGLE_STAGE_SCHEDULES
from moe_train.parallel.spawn import run_ranks

DIM = 256  # the activation a stage sends: (micro-batch 1, DIM)


class _Input(torch.autograd.Function):
    """The part of a stage on the activation's path: F in forward, B in backward."""

    @staticmethod
    def forward(ctx, x, seconds, work):
        ctx.seconds, ctx.work = seconds, work
        work(seconds[0])
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.work(ctx.seconds[1])
        return grad.contiguous(), None, None  # a sum's gradient is an expanded view: gloo sends whole tensors


class _Weight(torch.autograd.Function):
    """The part only the weights' gradient needs: W, which the zero-bubble schedules defer."""

    @staticmethod
    def forward(ctx, w, seconds, work):
        ctx.seconds, ctx.work = seconds, work
        return w.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.work(ctx.seconds[2])
        return grad, None, None


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


_MATRIX = torch.randn(256, 256)


def _matmul(seconds: float) -> None:
    """About `seconds` of products on one core (calibrated once per process)."""
    for _ in range(max(1, round(seconds * _matmul.rate))):
        _MATRIX @ _MATRIX


def _calibrate() -> None:
    start = time.perf_counter()
    for _ in range(200):
        _MATRIX @ _MATRIX
    _matmul.rate = 200 / (time.perf_counter() - start)


class ToyStage(torch.nn.Module):
    def __init__(self, seconds: tuple[float, float, float], work):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(DIM))
        self.seconds, self.work = seconds, work

    def forward(self, x):
        return _Input.apply(x, self.seconds, self.work) + _Weight.apply(self.weight, self.seconds, self.work)


def rank_main(rank: int, pp: int, plan: list, ms: float, work: str, repeat: int, result_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

    from moe_train.parallel.topology import stage_ids

    torch.set_num_threads(1)
    fn = _sleep if work == "sleep" else _matmul
    if work == "matmul":
        _calibrate()
    if pp > 1:
        dist.init_process_group("gloo")
    results = []
    for schedule_name, m in plan:
        per_rank = 1 if schedule_name in SINGLE_STAGE_SCHEDULES or pp == 1 else 2
        seconds = (ms / 1000 / per_rank,) * 3
        x = torch.randn(m, DIM)
        if pp == 1:  # no pipeline: each micro-batch forward and backward in turn
            stage = ToyStage(seconds, fn)

            def step(stage=stage, x=x):
                for micro in x.split(1):
                    stage(micro.requires_grad_()).sum().backward()

        else:
            num_stages = pp * per_rank
            ids = stage_ids(rank, pp, per_rank, schedule_name)
            stages = [
                PipelineStage(
                    ToyStage(seconds, fn),
                    s,
                    num_stages,
                    torch.device("cpu"),
                    input_args=torch.empty(1, DIM, device="meta", requires_grad=s > 0),
                    output_args=torch.empty(1, DIM, device="meta", requires_grad=True),
                )
                for s in sorted(ids)
            ]
            cls = get_schedule_class(schedule_name)
            stage_arg = stages[0] if issubclass(cls, PipelineScheduleSingle) else stages
            schedule = cls(stage_arg, n_microbatches=m, loss_fn=lambda out, target: out.sum())

            def step(schedule=schedule, x=x):
                schedule.step(x, target=x)

        step()  # warm-up: the first sends connect
        times = []
        for _ in range(repeat):
            if pp > 1:
                dist.barrier()
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        results.append({"schedule": schedule_name, "m": m, "step_s": statistics.median(times)})
    if rank == 0:
        Path(result_dir, "results.json").write_text(json.dumps(results))
    if pp > 1:
        dist.destroy_process_group()


def theory(schedule: str, p: int, m: int) -> float | None:
    if p == 1:
        return 0.0
    if schedule in ("GPipe", "1F1B"):
        return (p - 1) / (m + p - 1)
    if schedule in ("Interleaved1F1B", "LoopedBFS"):  # v = 2 stages per rank
        return (p - 1) / (2 * m + p - 1)
    return None  # the zero-bubble schedules: measured only


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument(
        "--schedules", nargs="+", default=list(PIPELINE_SCHEDULES), choices=PIPELINE_SCHEDULES
    )
    parser.add_argument("--ms", type=float, default=30.0, help="F, B and W of a stage, milliseconds each")
    parser.add_argument("--work", choices=["sleep", "matmul"], default="sleep")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    rows = []
    for pp in args.pps:
        plan = []
        for m in args.micro_batches:
            for name in args.schedules if pp > 1 else ["1F1B"]:
                fewest = {"GPipe": 1, "DualPipeV": 2 * pp}.get(name, pp)  # as moe_train checks
                if m >= fewest:
                    plan.append((name, m))
        with tempfile.TemporaryDirectory() as tmp:
            run_ranks(
                pp, rank_main, pp, plan, args.ms, args.work, args.repeat, tmp, result_dir=tmp, timeout=1800
            )
            measured = json.loads(Path(tmp, "results.json").read_text())
        for r in measured:
            ideal = r["m"] * 3 * args.ms / 1000
            bubble = 1 - ideal / r["step_s"]
            expected = theory(r["schedule"], pp, r["m"])
            rows.append(
                {
                    "pp": pp,
                    "schedule": r["schedule"] if pp > 1 else "(none)",
                    "micro_batches": r["m"],
                    "step_s": r["step_s"],
                    "ideal_s": ideal,
                    "bubble": round(bubble, 3),
                    "theory": None if expected is None else round(expected, 3),
                    "gap_points": None if expected is None else round(100 * (bubble - expected), 1),
                }
            )
    print_table(
        rows, ["pp", "schedule", "micro_batches", "step_s", "ideal_s", "bubble", "theory", "gap_points"]
    )
    write_json("pipeline_bubble", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
