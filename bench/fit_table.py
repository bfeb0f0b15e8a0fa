"""Which GPUs each published preset needs: tools.plan's fewest-GPU layout at 80 GB per GPU,
sequence 4096, micro-batch 1, full activation recompute, bf16, for both engines.

    python -m bench.fit_table [--gpu-memory-gb 80] [model=... overrides for every preset]

Prints the README's fit table (markdown) and writes JSON.
"""

from __future__ import annotations

import argparse

from bench.common import write_json
from moe_train.tools.hydra_config import compose_config
from moe_train.tools.memory import GIB, ModelShapes
from moe_train.tools.plan import fewest_gpus

PRESETS = [
    "mixtral_8x7b",
    "dbrx",
    "deepseekmoe_16b",
    "deepseekmoe_145b",
    "deepseek_v2_lite",
    "deepseek_v3",
    "grok1",
    "moe_1b",
    "llama2_7b",
    "llama3_8b",
    "llama3_70b",
    "solar_10_7b",
]
FULL_SIZE = ["data.seq_len=4096", "trainer.micro_batch_size=1", "trainer.activation_checkpointing=true"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    args, overrides = parser.parse_known_args()
    memory = int(args.gpu_memory_gb * 1e9)
    rows = []
    for preset in PRESETS:
        shapes = ModelShapes(compose_config([f"model={preset}", *FULL_SIZE, *overrides]))
        row = {"preset": preset, "dense_B": shapes.numel(False) / 1e9, "experts_B": shapes.numel(True) / 1e9}
        for engine in ("native", "deepspeed"):
            found = fewest_gpus(shapes, engine, bf16=True, memory=memory, max_gpus=4096)
            row[engine] = None if found is None else {"layout": vars(found[0]), "gib": found[1].total / GIB}
        rows.append(row)

    def cell(found) -> str:
        if found is None:
            return "more than 4096"
        layout = found["layout"]
        return f"{layout['gpus']} (ep {layout['ep']}, {found['gib']:.0f} GiB)"

    print("| preset | dense | routed experts | engine=native (FSDP2) | engine=deepspeed (ZeRO-1/2) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['dense_B']:.1f}B | {r['experts_B']:.1f}B | {cell(r['native'])} "
            f"| {cell(r['deepspeed'])} |"
        )
    write_json("fit_table", {"gpu_memory_gb": args.gpu_memory_gb, "overrides": FULL_SIZE, "rows": rows})


if __name__ == "__main__":
    main()
