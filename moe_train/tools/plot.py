"""Plots of a run directory: loss curves and one expert-load heatmap per MoE layer, to compare runs
and to see whether the router keeps the experts balanced."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moe_train.train.metrics import read_metrics  # noqa: E402


def plot_losses(runs: dict[str, list[dict]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, metrics in runs.items():
        train = [(m["step"], m["lm_loss"]) for m in metrics if "lm_loss" in m]
        line = ax.plot(*zip(*train), alpha=0.5, label=f"{name} train")[0] if train else ax.plot([])[0]
        val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
        if val:
            ax.plot(*zip(*val), "o-", color=line.get_color(), label=f"{name} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_expert_load(metrics: list[dict], out_dir: Path) -> list[Path]:
    paths = []
    keys = sorted(
        {k for m in metrics for k in m if k.startswith("expert_load/")},
        key=lambda k: int(k.rsplit("_", 1)[1]),
    )
    for key in keys:
        rows = [(m["step"], m[key]) for m in metrics if key in m]
        steps = [s for s, _ in rows]
        load = np.array([v for _, v in rows]).T  # (experts, steps)
        fig, ax = plt.subplots(figsize=(8, 0.3 * load.shape[0] + 1.5))
        image = ax.imshow(
            load,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            extent=(steps[0] - 0.5, steps[-1] + 0.5, load.shape[0] - 0.5, -0.5),
        )
        fig.colorbar(image, ax=ax, label=f"share of tokens (balanced = {1 / load.shape[0]:.3f})")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        layer = key.rsplit("_", 1)[1]
        ax.set_title(f"expert load, layer {layer}")
        fig.tight_layout()
        path = out_dir / f"expert_load_layer_{layer}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


EPILOG = """\
example:
    python -m moe_train.tools.plot RUN_DIR [OTHER_RUN_DIR ...] [--out DIR]

Writes loss.png (train and validation loss of every run given, for comparing runs) and, for the
first run, expert_load_layer_<i>.png (share of tokens per expert over steps; balanced = 1/E).
"""


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="where PNGs go (default: the first run dir)")
    args = parser.parse_args(argv)
    runs = {}
    for run_dir in args.run_dirs:
        try:
            metrics = read_metrics(run_dir)
        except UnicodeDecodeError:  # binary bytes where JSON lines belong
            print(f"error: {run_dir / 'metrics.jsonl'} is not a text file of JSON lines", file=sys.stderr)
            sys.exit(2)
        if not metrics:
            print(f"error: {run_dir} has no metrics.jsonl with entries", file=sys.stderr)
            sys.exit(2)
        runs[run_dir.name] = metrics
    out_dir = args.out or args.run_dirs[0]
    if out_dir.exists() and not out_dir.is_dir():
        print(f"error: --out {out_dir} is a file, not a folder", file=sys.stderr)
        sys.exit(2)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file above it, a folder we may not write
        print(f"error: --out {out_dir} cannot be created: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    plot_losses(runs, out_dir / "loss.png")
    written = [out_dir / "loss.png", *plot_expert_load(runs[args.run_dirs[0].name], out_dir)]
    for path in written:
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
