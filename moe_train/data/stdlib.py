"""The embedded default corpus: this Python's standard library sources, found through sysconfig.

Every machine that runs Python has them, so the default training needs no download. Files are split
into train and validation by a hash of their relative path, which is the same on every machine.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import numpy as np

from moe_train.config import ConfigError


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if "site-packages" not in p.parts and "__pycache__" not in p.parts
    )
    if not files:
        raise ConfigError(f"data.name=stdlib found no .py files under {root}")
    return root, files


def is_validation(relative_path: str, val_fraction: float) -> bool:
    digest = hashlib.sha1(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


def load_stdlib_corpus(val_fraction: float, eos_id: int) -> dict[str, np.ndarray]:
    """Byte tokens of the train and validation files, each file followed by eos_id; uint8 arrays."""
    root, files = stdlib_files()
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    eos = bytes([eos_id])
    for path in files:
        split = "val" if is_validation(path.relative_to(root).as_posix(), val_fraction) else "train"
        parts[split].append(path.read_bytes().replace(eos, b"") + eos)
    return {split: np.frombuffer(b"".join(chunks), dtype=np.uint8) for split, chunks in parts.items()}
