"""Sparse upcycling against continuing the dense model, from the same checkpoint, same steps.

    python -m bench.upcycling [--base-steps 150] [--steps 150]

1. Train dense_tiny for --base-steps on the default corpus.
2. From that checkpoint, train --steps more (a) as the same dense model, (b) upcycled to 8 experts
   top-2 (full copies), (c) upcycled fine-grained (16 experts of half width, top-4), each with a
   fresh optimizer and the same schedule and data. Prints the validation losses, writes JSON and a
   plot of the three curves (moe_train.tools.plot). Also measures how far each upcycled model is from
   the dense one at step 0 (relative difference of the logits).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.common import RESULTS, print_table, write_json
from bench.paper_claims import train
from moe_train.tools import plot
from moe_train.tools.upcycle import upcycle
from moe_train.train.checkpoint import load_model


def start_gap(upcycled: Path, dense: Path) -> float:
    _, a = load_model(upcycled)
    _, b = load_model(dense)
    tokens = torch.randint(0, b.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x, y = a(tokens).logits, b(tokens).logits
    return ((x - y).norm() / y.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument(
        "--fine-grained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the 16-expert half-width variant",
    )
    parser.add_argument("--eval-every", type=int, default=25)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        train("dense_tiny", base, "model=dense_tiny", f"trainer.max_steps={args.base_steps}")
        variants = {"dense": base, "upcycled_8x_top2": upcycle(base, tmp / "up8", num_experts=8, top_k=2)}
        if args.fine_grained:
            variants["upcycled_16x_half_top4"] = upcycle(
                base, tmp / "up16", num_experts=16, top_k=4, granularity=2
            )
        rows, runs = [], {}
        for name, init in variants.items():
            if name == "dense":  # the last checkpoint of the base run
                init = sorted((base / "checkpoints").iterdir())[-1]
            out = tmp / name
            metrics = train(
                name,
                out,
                f"trainer.init_from={init}",
                f"trainer.max_steps={args.steps}",
                f"trainer.eval_every={args.eval_every}",
            ).metrics
            runs[name] = out, metrics
            final = metrics[-1]
            rows.append(
                {
                    "model": name,
                    "start_gap": 0.0 if name == "dense" else start_gap(init, base),
                    "val_loss": final["val_loss"],
                    "val_loss_per_byte": final["val_loss_per_byte"],
                    "tokens_per_s": sum(m["tokens_per_sec"] for m in metrics) / len(metrics),
                }
            )
        print_table(rows, list(rows[0]))
        RESULTS.mkdir(parents=True, exist_ok=True)
        plot.main([str(p) for p, _ in runs.values()] + ["--out", str(RESULTS / "upcycling")])
        write_json(
            "upcycling",
            {
                "rows": rows,
                "base_steps": args.base_steps,
                "steps": args.steps,
                "curves": {
                    n: [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
                    for n, (_, metrics) in runs.items()
                },
            },
        )


if __name__ == "__main__":
    main()
