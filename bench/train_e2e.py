"""End-to-end training throughput and MFU of a preset: the real Trainer, real data, N steps.

    python -m bench.train_e2e model=mixtral_tiny                  # CPU, fp32
    python -m bench.train_e2e model=moe_1b data.seq_len=2048 ...   # GPU, bf16

Any Hydra override is accepted. Reports the median over the timed steps (after warm-up) of
tokens/s and of MFU = flops_per_token * tokens/s / peak, with flops_per_token = 6 x active matmul
parameters + 12 x layers x dim x seq_len (PaLM's convention; with MLA 6 x layers x heads x
(query/key + value head size) x seq_len; multi-token prediction's depths, their extra pass through
the output head included) and the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from bench.common import print_table, write_json
from moe_train.parallel.topology import Topology
from moe_train.tools.cli import retain_freed_memory
from moe_train.tools.hydra_config import compose_config
from moe_train.train.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print where one step's time goes")
    args, overrides = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as out_dir:
        config = compose_config([f"trainer.out_dir={out_dir}", "logging.wandb.mode=disabled", *overrides])
        topology = Topology.setup(config.parallel, config.trainer.device)
        if topology.device.type == "cpu":
            retain_freed_memory()  # as train.py does
        trainer = Trainer(config, topology)
        for _ in range(args.warmup):
            trainer.train_step()
        steps = [trainer.train_step() for _ in range(args.steps)]
        if args.profile:
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                if torch.cuda.is_available()
                else None
            ) as prof:
                trainer.train_step()
            print(
                prof.key_averages().table(
                    sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total",
                    row_limit=20,
                )
            )
    row = {
        "model": config.model.name,
        "device": str(topology.device),
        "precision": "bf16" if trainer.autocast_dtype else "fp32",
        "total_params": trainer.size.total_params,
        "active_params": trainer.size.active_params,
        "flops_per_token": trainer.size.flops_per_token,
        "tokens_per_step": config.trainer.global_batch_size * config.data.seq_len,
        "step_s": statistics.median(m["step_time"] for m in steps),
        "tokens_per_s": statistics.median(m["tokens_per_sec"] for m in steps),
        "loss_first": steps[0]["loss"],
        "loss_last": steps[-1]["loss"],
    }
    row["achieved_tflops"] = row["flops_per_token"] * row["tokens_per_s"] / 1e12
    if "mfu" in steps[-1]:
        row["mfu"] = statistics.median(m["mfu"] for m in steps)
    if torch.cuda.is_available():
        row["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print_table([row], list(row))
    write_json(f"train_e2e-{config.model.name}", {"row": row, "overrides": overrides})


if __name__ == "__main__":
    main()
