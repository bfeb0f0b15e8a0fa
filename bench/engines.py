"""Native engine vs DeepSpeed ZeRO-1 / ZeRO-2 (/ ZeRO-Offload) on the same run: step time,
optimizer memory per rank, and the checkpoint's save and load time and size, on N gloo processes
(CPU) or N GPUs.

    python -m bench.engines                          # 2 processes, mixtral_tiny, ep=1 and ep=2
    python -m bench.engines --world 2 --offload model=dbrx_tiny

Optimizer memory is measured from each rank's optimizer tensors (Adam's moments; for ZeRO also the
fp32 master copy of the rank's partition), not estimated. Step time: median over the timed steps.
Checkpoint: after the timed steps, median of 3 saves (Checkpointer.save: every rank's shards,
config.yaml, the rename) and of 3 loads of it; its size on disk. In the background
(trainer.async_checkpoint): bg_stall_s, how long save() holds training (the copy into host memory),
and bg_step_s, the mean time of the 3 steps that run while the files are written (including the
wait for the write at the end, if it is still going), to compare with step_s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import QUIET_RUN, print_table, write_json
from moe_train.parallel.spawn import run_ranks

ENGINES = {
    "native": [],
    "zero1": ["engine=deepspeed", "engine.zero_stage=1"],
    "zero2": ["engine=deepspeed", "engine.zero_stage=2"],
    "zero2_offload": ["engine=deepspeed", "engine.zero_stage=2", "engine.offload_optimizer=true"],
}


def worker(rank: int, overrides: list[str], warmup: int, steps: int, result_dir: str) -> None:
    from moe_train.parallel.topology import Topology
    from moe_train.tools.hydra_config import compose_config
    from moe_train.train.checkpoint import Checkpointer
    from moe_train.train.trainer import Trainer

    config = compose_config(overrides)
    trainer = Trainer(config, Topology.setup(config.parallel, config.trainer.device))
    first = trainer.train_step()  # step 1 carries the optimizer memory
    for _ in range(warmup - 1):
        trainer.train_step()
    timed = [trainer.train_step() for _ in range(steps)]
    saves, loads = [], []
    for _ in range(3):
        start = time.perf_counter()
        path = trainer.checkpointer.save(config, trainer.engine, trainer.progress)
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer.checkpointer.load(path, trainer.engine, trainer.config.model)
        loads.append(time.perf_counter() - start)
    # in the background (trainer.async_checkpoint): how long save() holds training, and how much
    # slower the next steps run while the files are written
    background = Checkpointer(Path(result_dir, "background"), trainer.topology, 1, background=True)
    stalls, overlapped = [], []
    for _ in range(3):
        start = time.perf_counter()
        background.save(config, trainer.engine, trainer.progress)
        stalls.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(3):
            trainer.train_step()
        background.finish()
        overlapped.append((time.perf_counter() - start) / 3)
    result = {
        "save_s": statistics.median(saves),
        "bg_stall_s": statistics.median(stalls),
        "bg_step_s": statistics.median(overlapped),
        "load_s": statistics.median(loads),
        "ckpt_mb": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20,
        "step_s": statistics.median(m["step_time"] for m in timed),
        "tokens_per_s": statistics.median(m["tokens_per_sec"] for m in timed),
        "loss_last": timed[-1]["loss"],
        **{k: v for k, v in first.items() if k.startswith("optimizer_")},
    }
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--eps", default="1,2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--offload", action="store_true", help="also ZeRO-2 with optimizer offload")
    args, overrides = parser.parse_known_args()
    engines = {k: v for k, v in ENGINES.items() if args.offload or "offload" not in k}
    rows = []
    for ep in [int(e) for e in args.eps.split(",")]:
        for name, engine in engines.items():
            with tempfile.TemporaryDirectory() as tmp:
                run = [
                    "data=stdlib_bytes",
                    "trainer.global_batch_size=8",
                    "trainer.micro_batch_size=2",
                    *QUIET_RUN,
                    f"trainer.out_dir={tmp}/run",
                    f"parallel.ep={ep}",
                    *overrides,
                    *engine,
                ]
                run_ranks(args.world, worker, run, args.warmup, args.steps, tmp, result_dir=tmp)
                ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.world)]
            rows.append(
                {
                    "engine": name,
                    "ep": ep,
                    "world": args.world,
                    "step_s": statistics.mean(r["step_s"] for r in ranks),
                    "tokens_per_s": ranks[0]["tokens_per_s"],
                    "moments_mb_per_rank": max(r["optimizer_moments_mb"] for r in ranks),
                    "master_mb_per_rank": max(r["optimizer_master_weights_mb"] for r in ranks),
                    "loss_last": ranks[0]["loss_last"],
                    "save_s": max(r["save_s"] for r in ranks),
                    "bg_stall_s": max(r["bg_stall_s"] for r in ranks),
                    "bg_step_s": statistics.mean(r["bg_step_s"] for r in ranks),
                    "load_s": max(r["load_s"] for r in ranks),
                    "ckpt_mb": ranks[0]["ckpt_mb"],
                }
            )
    for row in rows:  # optimizer memory relative to the native engine at the same ep
        native = next(r for r in rows if r["engine"] == "native" and r["ep"] == row["ep"])
        row["moments_vs_native"] = row["moments_mb_per_rank"] / native["moments_mb_per_rank"]
    print_table(rows, list(rows[0]))
    write_json("engines", {"rows": rows, "overrides": overrides})


if __name__ == "__main__":
    main()
