"""The embedded default corpus: this Python's standard library sources, found through sysconfig.
Every machine that runs Python has them, so the default training needs no download."""

from __future__ import annotations

import hashlib
import sys
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


def _path_hash(relative_path: str) -> float:
    """A number in [0, 1) fixed by the path alone: the same on every machine."""
    return int.from_bytes(hashlib.sha1(relative_path.encode()).digest()[:8], "little") / 2**64


def is_validation(relative_path: str, val_fraction: float) -> bool:
    """Whether a file is in data=stdlib_bytes's validation split (chosen by a hash of its path)."""
    return _path_hash(relative_path) < val_fraction


def load_stdlib_bytes(val_fraction: float, eos_id: int) -> dict[str, np.ndarray]:
    """data=stdlib_bytes, kept in memory: byte tokens of the train and validation files, each file
    followed by eos_id; uint8 arrays."""
    root, files = stdlib_files()
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    eos = bytes([eos_id])
    for path in files:
        split = "val" if is_validation(path.relative_to(root).as_posix(), val_fraction) else "train"
        parts[split].append(path.read_bytes().replace(eos, b"") + eos)
    return {split: np.frombuffer(b"".join(chunks), dtype=np.uint8) for split, chunks in parts.items()}


def prepare_stdlib(cache_dir: Path, vocab_size: int, workers: int | None = None) -> tuple[Path, Path]:
    """data=stdlib, prepared once into an indexed dataset with a BPE trained on it: (dataset prefix,
    tokenizer.json) under cache_dir.

    Files are ordered by the hash of their path, so megatron's split by document ranges gives a
    validation set drawn from the whole library rather than its alphabetical tail."""
    from moe_train.data.prepare import prepare

    root, files = stdlib_files()
    version = f"{sys.version_info.major}{sys.version_info.minor}"
    out_dir = cache_dir / f"stdlib-py{version}-bpe{vocab_size}"
    prefix, tokenizer = out_dir / "stdlib", out_dir / "tokenizer.json"
    if not (Path(f"{prefix}.idx").is_file() and tokenizer.is_file()):
        files.sort(key=lambda p: _path_hash(p.relative_to(root).as_posix()))
        # files in hash order, so the BPE's sample (small, for a quick first run) spans the whole library
        result = prepare(
            files, prefix, vocab_size=vocab_size, workers=workers, progress=False, bpe_sample_bytes=8_000_000
        )
        print(f"prepared the standard-library corpus once: {result.summary()}", flush=True)
    return prefix, tokenizer
