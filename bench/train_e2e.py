"""End-to-end training throughput and MFU of a preset: the real Trainer, real data, N steps.

    python -m bench.train_e2e model=mixtral_tiny                  # CPU, fp32
    python -m bench.train_e2e model=moe_1b data.seq_len=2048 ...   # GPU, bf16
    python -m bench.train_e2e --compare compile --profile model=dbrx_tiny   # eager vs compiled

Any Hydra override is accepted. Reports the median over the timed steps (after warm-up) of
tokens/s and of MFU = flops_per_token * tokens/s / peak, with flops_per_token = 6 x active matmul
parameters + 12 x layers x dim x seq_len (PaLM's convention; with MLA 6 x layers x heads x
(query/key + value head size) x seq_len; multi-token prediction's depths, their extra pass through
the output head included) and the device's dense bf16 peak. first_step_s is the first step's time,
compilation included where trainer.compile=true (shorter where inductor's on-disk cache already
holds the kernels: TORCHINDUCTOR_CACHE_DIR=<an empty folder> for a cold start).

--compare compile runs the preset eagerly, then compiled (a fresh Trainer each, one after the other
in this process: two copies of a large model would not fit together), and adds speedup (tokens/s
over eager's); with --interleave both Trainers live at once and take their timed steps in turns
(for small models on a shared machine: the speedup is paired per round). --profile adds where a
step's time goes over 3 more steps (bench.step_profile): the shares of matmuls, attention, dispatch
and combine, communication, optimizer, other ops and idle.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile

import torch

from bench.common import print_table, write_json
from bench.step_profile import CATEGORIES, profile_step
from moe_train.parallel.parallelize import compile_wanted
from moe_train.parallel.topology import Topology
from moe_train.tools.cli import retain_freed_memory
from moe_train.tools.hydra_config import compose_config
from moe_train.train.trainer import Trainer

COMPARE = {
    "compile": ("trainer.compile=false", "trainer.compile=true"),
    "document_mask": ("data.document_mask=false", "data.document_mask=true"),
}


def start(config, topology: Topology, warmup: int) -> tuple[Trainer, dict]:
    """A fresh Trainer past its `warmup` untimed steps, and the first step's metrics."""
    trainer = Trainer(config, topology)
    first = trainer.train_step()  # compilation, where compiled, and the allocator's first fill
    for _ in range(warmup - 1):
        trainer.train_step()
    return trainer, first


def summarise(trainer: Trainer, first: dict, timed: list[dict]) -> dict:
    config = trainer.config
    row = {
        "model": config.model.name,
        "device": str(trainer.device),
        "precision": "bf16" if trainer.autocast_dtype else "fp32",
        "compile": compile_wanted(config, trainer.device),
        "document_mask": config.data.document_mask,
        "total_params": trainer.size.total_params,
        "active_params": trainer.size.active_params,
        "flops_per_token": trainer.size.flops_per_token,
        "tokens_per_step": config.trainer.global_batch_size * config.data.seq_len,
        "first_step_s": first["step_time"],
        "step_s": statistics.median(m["step_time"] for m in timed),
        "tokens_per_s": statistics.median(m["tokens_per_sec"] for m in timed),
        "loss_first": timed[0]["loss"],
        "loss_last": timed[-1]["loss"],
    }
    row["achieved_tflops"] = row["flops_per_token"] * row["tokens_per_s"] / 1e12
    if "mfu" in timed[-1]:
        row["mfu"] = statistics.median(m["mfu"] for m in timed)
    return row


def one_after_another(configs, topology, args) -> tuple[list[dict], list[dict | None]]:
    """Each config's Trainer built, timed and freed before the next: what fits a large model."""
    rows, profiles = [], []
    for config in configs:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer, first = start(config, topology, args.warmup)
        timed = [trainer.train_step() for _ in range(args.steps)]
        profiles.append(profile_step(trainer.train_step, topology.device) if args.profile else None)
        rows.append(summarise(trainer, first, timed))
        if torch.cuda.is_available():
            rows[-1]["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        del trainer  # the next Trainer is built in the memory this one held
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(configs) > 1:
            rows[-1]["speedup"] = rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"]
        if len(rows) < len(configs):  # written now too: a later run that fails or is stopped keeps this
            write_compare(args, rows, profiles)
    return rows, profiles


def interleaved(configs, topology, args) -> tuple[list[dict], list[dict | None]]:
    """Every config's Trainer alive at once, their timed steps taken in turns (the order rotating),
    so that a slow spell of a shared machine slows both sides of a comparison; speedup is the
    median over rounds of the first config's step time over this one's in the same round."""
    runs = [start(config, topology, args.warmup) for config in configs]
    timed: list[list[dict]] = [[] for _ in runs]
    for r in range(args.steps):
        for i in [*range(len(runs))][r % len(runs) :] + [*range(len(runs))][: r % len(runs)]:
            timed[i].append(runs[i][0].train_step())
    profiles = [profile_step(t.train_step, topology.device) if args.profile else None for t, _ in runs]
    rows = [summarise(trainer, first, steps) for (trainer, first), steps in zip(runs, timed)]
    for row, steps in zip(rows, timed):
        row["speedup"] = statistics.median(
            base["step_time"] / m["step_time"] for base, m in zip(timed[0], steps)
        )
    return rows, profiles


def label(row: dict) -> str:
    return ("compiled" if row["compile"] else "eager") + (", document mask" if row["document_mask"] else "")


def write_compare(args, rows: list[dict], profiles: list[dict | None]) -> None:
    runs = {label(row): p for row, p in zip(rows, profiles) if p}
    write_json(
        f"train_e2e-{rows[0]['model']}-compare-{args.compare}",
        {"rows": rows, "overrides": args.overrides, "interleaved": args.interleave, "profiles": runs},
        out_dir=args.out_dir,
    )


def print_profiles(profiles: dict[str, dict]) -> None:
    rows = [
        {"run": run, "step_ms": p["step_ms"], **{c: f"{100 * p['shares'][c]:.1f}%" for c in CATEGORIES}}
        for run, p in profiles.items()
    ]
    measured = next(iter(profiles.values()))["time"]
    print(f"where one step's time goes ({measured}; idle: the rest of the wall time)")
    print_table(rows, list(rows[0]))
    for run, p in profiles.items():
        print(f"{run}: the largest ops by self time")
        print_table(p["top_ops"], ["op", "ms_per_step", "share"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps, the first included")
    parser.add_argument("--profile", action="store_true", help="where a step's time goes (4 more steps)")
    parser.add_argument(
        "--compare",
        choices=list(COMPARE),
        default=None,
        help="compile: eager, then compiled; document_mask: without, then with; in one table",
    )
    parser.add_argument(
        "--interleave", action="store_true", help="with --compare: both Trainers at once, steps in turns"
    )
    parser.add_argument("--out-dir", default=None, help="the JSON's folder (default bench/results)")
    args, args.overrides = parser.parse_known_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step is timed apart)")
    if args.interleave and not args.compare:
        parser.error("--interleave needs --compare")
    variants = COMPARE[args.compare] if args.compare else (None,)
    with tempfile.TemporaryDirectory() as out_dir:
        base = ["logging.wandb.mode=disabled", *args.overrides]
        configs = [
            compose_config([*base, f"trainer.out_dir={out_dir}/{i}", *([v] if v else [])])
            for i, v in enumerate(variants)
        ]
        topology = Topology.setup(configs[0].parallel, configs[0].trainer.device)
        try:
            if topology.device.type == "cpu":
                retain_freed_memory()  # as train.py does
            rows, profiles = (interleaved if args.interleave else one_after_another)(configs, topology, args)
        finally:
            topology.close()
    print_table(rows, list(rows[-1]))
    if any(profiles):
        print_profiles({label(r): p for r, p in zip(rows, profiles) if p})
    if args.compare:
        write_compare(args, rows, profiles)
    else:
        payload = {"row": rows[0], "overrides": args.overrides}
        if profiles[0]:
            payload["profile"] = profiles[0]
        write_json(f"train_e2e-{rows[0]['model']}", payload, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
