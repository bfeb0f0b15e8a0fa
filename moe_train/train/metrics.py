"""Where metrics go: metrics.jsonl in the run directory, wandb, and a progress bar (rank 0 only)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch

from moe_train.config import Config, ConfigError

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s by device name (the vendors' datasheets, without sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's peak bf16 rate, or None where unknown (CPUs): MFU is then not logged."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    metrics = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            metrics.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash mid-write
            if line.strip():
                log.warning("%s line %d is not JSON (cut short?): skipped", path, number)
    return metrics


def _replace(path: Path, text: str) -> None:
    """Write `text` beside `path`, then rename it over: a kill midway leaves the old file whole."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class MetricsWriter:
    """Appends one JSON object per logged step; mirrors the scalars to wandb."""

    def __init__(self, config: Config, resumed_step: int):
        self.path = Path(config.trainer.out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A run that crashed after its last checkpoint logged steps that the resumed run repeats.
        kept = [m for m in read_metrics(self.path.parent) if m.get("step", 0) <= resumed_step]
        _replace(self.path, "".join(json.dumps(m) + "\n" for m in kept))
        self.wandb = None
        wandb_cfg = config.logging.wandb
        if wandb_cfg.mode != "disabled":
            import wandb  # imported only when used: it is slow to import

            out_dir = Path(config.trainer.out_dir).resolve()
            try:
                self.wandb = wandb.init(
                    project=wandb_cfg.project,
                    entity=wandb_cfg.entity,
                    name=wandb_cfg.name or out_dir.name,
                    id=hashlib.sha1(str(out_dir).encode()).hexdigest()[:16],  # resumes the same run
                    resume="allow",
                    mode=wandb_cfg.mode,
                    dir=str(out_dir),
                    config=asdict(config),
                    settings=wandb.Settings(quiet=True),
                )
            except wandb.errors.UsageError as e:  # online without a login, say
                raise ConfigError(
                    f"logging.wandb.mode={wandb_cfg.mode}: {str(e).strip().splitlines()[0]} "
                    "(or log offline: logging.wandb.mode=offline, then `wandb sync`)"
                ) from None

    def log(self, metrics: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb is not None:
            self.wandb.log(_scalars(metrics), step=metrics["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _scalars(metrics: dict) -> dict:
    """wandb gets every number; a list (one layer's expert load) becomes one scalar per expert."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, list):
            out.update({f"{key}/expert_{i}": v for i, v in enumerate(value)})
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = value
    return out
