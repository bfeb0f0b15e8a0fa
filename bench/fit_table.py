"""Which GPUs each published preset needs: tools.plan's fewest-GPU layout at 80 GB per GPU,
sequence 4096, micro-batch 1, full activation recompute, bf16, a global batch of 1024 sequences
(4M tokens: the pipeline's micro-batches per step), for both engines; and deepseek_v3 as
DeepSeek-V3 was trained (2048 GPUs, PP16 x EP64, its global batch of 15360 sequences) beside the
fewest GPUs the plan finds for that batch.

    python -m bench.fit_table [--gpu-memory-gb 80] [model=... overrides for every preset]

Prints the README's fit table (markdown) and writes JSON.
"""

from __future__ import annotations

import argparse

from bench.common import write_json
from moe_train.tools.hydra_config import compose_config
from moe_train.tools.memory import GIB, Layout, ModelShapes, native_bytes
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
FULL_SIZE = [
    "data.seq_len=4096",
    "trainer.micro_batch_size=1",
    "trainer.activation_checkpointing=true",
    "trainer.global_batch_size=1024",
]
# DeepSeek-V3 (DeepSeek-AI 2024, sec. 3.2.2 and 4.2): 2048 H800 GPUs, 16-way pipeline (DualPipe),
# 64-way expert parallelism over 8 nodes, ZeRO-1 data parallelism over the rest (128 ranks per
# stage), batch 15360 sequences of 4096 tokens. Here: parallel.pp=16, ep=64, ZeRO-1 taken as FSDP
# over the stage's 128 ranks (dp_shard=128), whose pipeline keeps each stage's weights gathered
# and its gradients whole through the step as ZeRO-1 does, with fp32 weights and moments sharded;
# and DualPipeV, torch's V-shaped form of DualPipe (two stages per rank).
AS_TRAINED = Layout(gpus=2048, ep=64, dp_shard=128, pp=16)
AS_TRAINED_BATCH = ["trainer.global_batch_size=15360", "parallel.pp_schedule=DualPipeV"]


def found_row(found) -> dict | None:
    return None if found is None else {"layout": vars(found[0]), "gib": found[1].total / GIB}


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
            row[engine] = found_row(fewest_gpus(shapes, engine, bf16=True, memory=memory, max_gpus=4096))
        rows.append(row)

    trained = ModelShapes(compose_config(["model=deepseek_v3", *FULL_SIZE, *AS_TRAINED_BATCH, *overrides]))
    sizes = {"dense_B": trained.numel(False) / 1e9, "experts_B": trained.numel(True) / 1e9}
    published = native_bytes(trained, AS_TRAINED, bf16=True)
    rows.append(
        {
            "preset": "deepseek_v3, as trained (batch 15360)",
            **sizes,
            "native": {"layout": vars(AS_TRAINED), "gib": published.total / GIB},
            "deepspeed": None,
            "bytes": published.as_dict(),
        }
    )
    smallest = fewest_gpus(trained, "native", bf16=True, memory=memory, max_gpus=4096)
    smallest_zero = fewest_gpus(trained, "deepspeed", bf16=True, memory=memory, max_gpus=4096)
    rows.append(
        {
            "preset": "deepseek_v3, batch 15360, fewest GPUs",
            **sizes,
            "native": found_row(smallest),
            "deepspeed": found_row(smallest_zero),
            "bytes": smallest[1].as_dict() if smallest else None,
        }
    )

    def cells(found, engine: str) -> str:
        keys = ("gpus", "pp", "ep", "dp_shard") if engine == "native" else ("gpus", "ep")
        if found is None:
            return " | ".join(["more than 4096", *[""] * len(keys)])
        layout = found["layout"]
        return " | ".join([*(str(layout[k]) for k in keys), f"{found['gib']:.0f} GiB"])

    print(
        "| preset | dense | routed experts | native (FSDP2): GPUs | pp | ep | dp_shard | peak "
        "| deepspeed (ZeRO-1/2): GPUs | ep | peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        as_trained = r["preset"].endswith("(batch 15360)")
        deepspeed = "n/a (pp=1 only) | | " if as_trained else cells(r["deepspeed"], "deepspeed")
        print(
            f"| {r['preset']} | {r['dense_B']:.1f}B | {r['experts_B']:.1f}B | {cells(r['native'], 'native')} "
            f"| {deepspeed} |"
        )
    write_json(
        "fit_table",
        {
            "gpu_memory_gb": args.gpu_memory_gb,
            "overrides": FULL_SIZE,
            "as_trained": {"layout": vars(AS_TRAINED), "overrides": AS_TRAINED_BATCH},
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
