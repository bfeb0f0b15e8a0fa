"""Data pipeline speed: corpus preparation throughput, and how long the trainer waits for data.

    python -m bench.data [--workers 1 2] [--repeat 3] [--steps 20]

1. Tokenize + write the standard-library corpus (31 MB of Python) into an indexed dataset with a
   byte-level BPE of 4096 entries trained on it (trained once, outside the timing), with 1 and 2
   worker processes: MB/s of text, and MB/s per worker (the median of --repeat runs: the machine
   is shared). The encoder is tiktoken, which gives exactly `tokenizers`' ids for this BPE.
2. The default training (data=stdlib): time spent reading each step's batch as a share of the step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.common import print_table, write_json
from moe_train.data.prepare import prepare
from moe_train.data.stdlib import prepare_stdlib, stdlib_files
from moe_train.parallel.topology import Topology
from moe_train.tools.hydra_config import compose_config
from moe_train.train.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cache = Path(compose_config([]).data.cache_dir).expanduser()
    _, tokenizer = prepare_stdlib(cache, 4096)
    _, files = stdlib_files()

    rows = []
    with tempfile.TemporaryDirectory() as out:
        for workers in args.workers:
            runs = [
                prepare(
                    files, Path(out) / f"w{workers}", tokenizer=tokenizer, workers=workers, progress=False
                )
                for _ in range(args.repeat)
            ]
            result = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
            rows.append(
                {
                    "workers": workers,
                    "engine": result.engine,
                    "MB": result.bytes / 1e6,
                    "seconds": result.seconds,
                    "MB_per_s": result.mb_per_s,
                    "MB_per_s_per_worker": result.mb_per_s / workers,
                    "tokens": result.tokens,
                    "bytes_per_token": result.bytes / result.tokens,
                }
            )
    print("corpus preparation (tokenize + write, BPE already trained)")
    print_table(rows, list(rows[0]))

    with tempfile.TemporaryDirectory() as out:
        config = compose_config([f"trainer.out_dir={out}", "logging.wandb.mode=disabled"])
        trainer = Trainer(config, Topology.setup(config.parallel, config.trainer.device))
        steps = [trainer.train_step() for _ in range(args.steps)][2:]
    wait = {
        "steps": len(steps),
        "median_step_s": statistics.median(m["step_time"] for m in steps),
        "median_data_s": statistics.median(m["data_time"] for m in steps),
        "data_share": sum(m["data_time"] for m in steps) / sum(m["step_time"] for m in steps),
    }
    print("\ntime waiting for data in the default training")
    print_table([wait], list(wait))
    write_json("data", {"prepare": rows, "loader": wait})


if __name__ == "__main__":
    main()
