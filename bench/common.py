"""Shared by the benchmarks: timing, a results table, and JSON output under bench/results/."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device: torch.device, warmup: int = 2, repeat: int = 5) -> float:
    """Median seconds per call of fn()."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_interleaved(
    fns: dict, device: torch.device, warmup: int = 2, repeat: int = 5
) -> dict[str, list[float]]:
    """Seconds of each fn in each of `repeat` rounds (round r's time at index r). Every round runs
    every fn once, the order rotating, so a ratio taken within a round is paired: a slow spell
    of a shared machine slows both sides of it, and whoever runs first does not bias it."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def machine() -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)


def write_json(name: str, payload: dict, out_dir: str | Path | None = None) -> Path:
    """payload and the machine as <out_dir>/<name>-<gpu|cpu>.json; out_dir None: bench/results/."""
    folder = RESULTS if out_dir is None else Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    path = folder / f"{name}-{device}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    print(f"wrote {path}")
    return path


# a run timed for its steps only: no evaluation, checkpoints, samples, wandb or progress bar
QUIET_RUN = [
    "trainer.eval_every=0",
    "trainer.ckpt_every=0",
    "trainer.num_samples=0",
    "logging.wandb.mode=disabled",
    "logging.progress_bar=false",
]
