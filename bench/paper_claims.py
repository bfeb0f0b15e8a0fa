"""The papers' claims, at tiny scale on the default corpus: dense against top-2 MoE against
fine-grained + shared MoE at equal total and active parameters (DeepSeekMoE's Table 1), and depth
up-scaling (SOLAR) and sparse upcycling against the dense model continued from the same checkpoint.

    python -m bench.paper_claims [--steps 1000] [--continue-steps 500] [--eval-every 50]
                                 [--comparisons matched solar upcycling] [--presets ...]

1. matched: each preset trained from scratch for --steps, as `train.py model=<preset>
   trainer.max_steps=<steps>` trains it (dense_tiny, mixtral_tiny, deepseekmoe_matched_tiny).
2. From dense_tiny's last checkpoint, on the tokens a longer dense run would have read next, with a
   fresh optimizer and the same schedule: the dense model continued for --continue-steps, against
   solar: depth up-scaled, L layers -> 2 (L - L/4) (moe_train.tools.depth_upscale), the same tokens;
   upcycling: 8 copies of the FFN, top-2 (moe_train.tools.upcycle), the same FLOPs (fewer steps).
Prints one table per comparison, writes every validation curve (nats/byte) to
bench/results/paper_claims-<steps>-cpu.json and one PNG per comparison beside it. Not a test: at the
defaults about an hour on 2 CPU cores shared with other jobs (docs/paper_claims.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import RESULTS, print_table, write_json  # noqa: E402
from moe_train.data.loader import build_datasets  # noqa: E402
from moe_train.model import ModelSize  # noqa: E402
from moe_train.parallel.topology import Topology  # noqa: E402
from moe_train.tools.depth_upscale import depth_upscale  # noqa: E402
from moe_train.tools.hydra_config import compose_config  # noqa: E402
from moe_train.tools.inspect import inspect_config  # noqa: E402
from moe_train.tools.upcycle import upcycle  # noqa: E402
from moe_train.train.callbacks import Callback, default_callbacks  # noqa: E402
from moe_train.train.metrics import read_metrics  # noqa: E402
from moe_train.train.trainer import Trainer  # noqa: E402

# a run as train.py makes it, less what a benchmark does not read (wandb, progress bar, samples)
COMMON = ["logging.wandb.mode=disabled", "logging.progress_bar=false", "trainer.num_samples=0"]
# DeepSeekMoE's Table 1 at tiny scale: the dense model of the MoEs' active size, GShard-style top-2,
# and fine-grained + shared experts at the same total and active parameters (conf/model/*.yaml)
MATCHED = ["dense_tiny", "mixtral_tiny", "deepseekmoe_matched_tiny"]
COMPARISONS = ("matched", "solar", "upcycling")
LOSSES = ("start", "at_half", "end")  # the table's validation losses (nats per byte)
START = "start.json"  # in a run directory: the validation loss before the first step


class EvaluateAtStart(Callback):
    """The validation loss of the weights a run starts from, before its first step, kept as
    <out_dir>/start.json (a resumed run has it from its first attempt)."""

    def on_fit_start(self, trainer):
        if trainer.progress.step == 0:
            path = Path(trainer.config.trainer.out_dir) / START
            path.write_text(json.dumps({"step": 0, **trainer.evaluate()}))


class ReadOn(Callback):
    """Starts a run's data where a run of `after_steps` steps of the same batch stopped: the
    samples that run would have read next. The stream's order does not depend on a run's length,
    only where it ends does, so the stream is rebuilt long enough for both."""

    def __init__(self, after_steps: int):
        self.after_steps = after_steps

    def on_fit_start(self, trainer):
        t = trainer.config.trainer
        longer = dataclasses.replace(t, max_steps=t.max_steps + self.after_steps)
        config = dataclasses.replace(trainer.config, trainer=longer)
        trainer.train_data = build_datasets(config, trainer.topology).train
        if trainer.progress.step == 0:  # a resumed run's position already counts them
            trainer.progress.consumed_samples = self.after_steps * t.global_batch_size


@dataclasses.dataclass
class Run:
    name: str
    size: ModelSize
    tokens_per_step: int
    start: dict | None  # validation before the first step
    metrics: list[dict]  # metrics.jsonl

    def curve(self) -> list[dict]:
        """Validation after 0, eval_every, ... steps, with the tokens and training FLOPs spent."""
        evals = [*([self.start] if self.start else []), *(m for m in self.metrics if "val_loss" in m)]
        return [
            {
                "step": m["step"],
                "tokens": m["step"] * self.tokens_per_step,
                "flops": m["step"] * self.tokens_per_step * self.size.flops_per_token,
                "val_loss": m["val_loss"],
                "val_loss_per_byte": m["val_loss_per_byte"],
            }
            for m in evals
        ]

    def row(self) -> dict:
        curve = self.curve()
        half = min(curve, key=lambda p: abs(p["step"] - curve[-1]["step"] / 2))
        return {
            "model": self.name,
            "params_M": self.size.total_params / 1e6,
            "active_M": self.size.active_params / 1e6,
            "MFLOPs_per_token": self.size.flops_per_token / 1e6,
            "steps": curve[-1]["step"],
            "TFLOPs": curve[-1]["flops"] / 1e12,
            "start": self.start["val_loss_per_byte"] if self.start else None,
            "at_half": half["val_loss_per_byte"],
            "end": curve[-1]["val_loss_per_byte"],
            "tokens_per_s": statistics.median(m["tokens_per_sec"] for m in self.metrics),
        }


def train(name: str, out: Path, *overrides: str, callbacks: Sequence[Callback] = ()) -> Run:
    """Train into `out` as train.py would, `callbacks` running before the default ones; a run
    already there is resumed, or read back if it is finished."""
    config = compose_config([f"trainer.out_dir={out}", *COMMON, *overrides])
    print(f"{name}: {config.model.name}, {config.trainer.max_steps} steps", flush=True)
    topology = Topology.setup(config.parallel, config.trainer.device)
    try:
        trainer = Trainer(config, topology)
        trainer.fit([*callbacks, EvaluateAtStart(), *default_callbacks(trainer)])
        t = trainer.config.trainer
        run = Run(name, trainer.size, t.global_batch_size * config.data.seq_len, None, [])
    finally:
        topology.close()
    start = out / START
    run.start = json.loads(start.read_text()) if start.is_file() else None
    run.metrics = read_metrics(out)
    print(f"{name}: {run.curve()[-1]['val_loss_per_byte']:.4f} nats/byte", flush=True)
    return run


def plot(runs: list[Run], x: str, path: Path, title: str, skip_start: bool = False) -> None:
    """Validation nats/byte against `x` (tokens or flops), and each run's difference from the first
    run at the same x (linear between its evaluations): below zero is ahead of it."""
    scale, label = (1e6, "tokens (M)") if x == "tokens" else (1e12, "training FLOPs (T)")
    fig, (ax, diff) = plt.subplots(1, 2, figsize=(12, 4.5))
    ref = runs[0].curve()[int(skip_start) :]
    for run in runs:
        curve = run.curve()[int(skip_start) :]
        xs = np.array([p[x] for p in curve]) / scale
        ys = np.array([p["val_loss_per_byte"] for p in curve])
        line = ax.plot(xs, ys, "o-", ms=3, label=f"{run.name} ({ys[-1]:.3f})")[0]
        ref_ys = np.interp(xs, [p[x] / scale for p in ref], [p["val_loss_per_byte"] for p in ref])
        diff.plot(xs, ys - ref_ys, "o-", ms=3, color=line.get_color(), label=run.name)
    ax.set(xlabel=label, ylabel="validation loss (nats per byte)", title=title)
    diff.axhline(0, color="grey", lw=0.8)
    diff.set(xlabel=label, ylabel=f"minus {runs[0].name} (nats per byte)", title="difference")
    for a in (ax, diff):
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def continuations(base: Path, steps: int, comparisons: Sequence[str], tmp: Path, eval_every: int) -> dict:
    """The dense base continued, depth up-scaled and upcycled, each from its last checkpoint."""
    base_steps = read_metrics(base)[-1]["step"]

    def resume(name: str, init: Path, num_steps: int) -> Run:
        return train(
            name,
            tmp / name,
            f"trainer.init_from={init}",
            f"trainer.max_steps={num_steps}",
            f"trainer.eval_every={eval_every}",
            callbacks=[ReadOn(base_steps)],
        )

    dense = resume("dense_tiny continued", base, steps)
    runs = {}
    if "solar" in comparisons:
        deeper = depth_upscale(base, tmp / "upscaled")
        runs["solar"] = [dense, resume("depth up-scaled", deeper, steps)]
    if "upcycling" in comparisons:
        upcycled = upcycle(base, tmp / "upcycled", num_experts=8, top_k=2)
        flops = inspect_config(compose_config([f"trainer.init_from={upcycled}"]))["flops_per_token"]
        same_flops = round(steps * dense.size.flops_per_token / flops)
        runs["upcycling"] = [dense, resume("upcycled 8x top-2", upcycled, same_flops)]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1000, help="pretraining steps of each preset")
    parser.add_argument("--continue-steps", type=int, default=None, help="default: half of --steps")
    parser.add_argument("--eval-every", type=int, default=None, help="default: --steps / 20")
    parser.add_argument("--comparisons", nargs="+", choices=COMPARISONS, default=list(COMPARISONS))
    parser.add_argument("--presets", nargs="+", default=MATCHED, help="the first is the reference")
    parser.add_argument(
        "--out", type=Path, default=None, help="keep the runs here, resumed by a rerun (default: a temp dir)"
    )
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(message)s")
    logging.getLogger("moe_train").setLevel(logging.INFO)  # the validation losses as they come
    continue_steps = args.continue_steps or args.steps // 2
    eval_every = args.eval_every or max(args.steps // 20, 1)
    presets = args.presets if "matched" in args.comparisons else ["dense_tiny"]
    if set(args.comparisons) - {"matched"} and "dense_tiny" not in presets:
        presets = ["dense_tiny", *presets]  # the base the continuations start from

    with tempfile.TemporaryDirectory() as temp:
        tmp = args.out or Path(temp)
        pretrained = {
            preset: train(
                preset,
                tmp / preset,
                f"model={preset}",
                f"trainer.max_steps={args.steps}",
                f"trainer.eval_every={eval_every}",
            )
            for preset in presets
        }
        groups = {"matched": list(pretrained.values())} if "matched" in args.comparisons else {}
        if set(args.comparisons) - {"matched"}:
            groups |= continuations(tmp / "dense_tiny", continue_steps, args.comparisons, tmp, eval_every)

    name = f"paper_claims-{args.steps}"
    titles = {
        "matched": f"from scratch, {args.steps} steps",
        "solar": f"depth up-scaling after {args.steps} dense steps: same tokens",
        "upcycling": f"sparse upcycling after {args.steps} dense steps: same FLOPs",
    }
    for comparison, runs in groups.items():
        print(f"\n{comparison}: validation nats/byte")
        rows = [run.row() for run in runs]  # the losses to 4 places: the gaps are hundredths
        rows = [{k: f"{v:.4f}" if k in LOSSES and v is not None else v for k, v in r.items()} for r in rows]
        print_table(rows, list(rows[0]))
        x = "flops" if comparison == "upcycling" else "tokens"
        path = RESULTS / f"{name}-{comparison}.png"
        RESULTS.mkdir(parents=True, exist_ok=True)
        plot(runs, x, path, titles[comparison], skip_start=comparison == "matched")
    write_json(
        name,
        {
            "steps": args.steps,
            "continue_steps": continue_steps,
            "eval_every": eval_every,
            "comparisons": {
                comparison: {
                    "rows": [run.row() for run in runs],
                    "curves": {run.name: run.curve() for run in runs},
                    "sizes": {run.name: dataclasses.asdict(run.size) for run in runs},
                }
                for comparison, runs in groups.items()
            },
        },
    )


if __name__ == "__main__":
    main()
