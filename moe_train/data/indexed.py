"""Training on prepared corpora: megatron-core's GPTDataset over IndexedDatasets, blended by weight.
Sample g is the same on every run with the same config, so the data position is one integer."""

from __future__ import annotations

import contextlib
import glob
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moe_train.config import ConfigError, first_line

log = logging.getLogger(__name__)


def megatron_datasets():
    """megatron.core.datasets, imported quietly: importing megatron.core warns about optional GPU
    packages (Transformer Engine, Apex) that its dataset code does not use."""
    logging.getLogger("megatron").setLevel(logging.ERROR)  # its import logs GPU-package fallbacks
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Transformer Engine|absl|Apex|megatron-core).*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import megatron.core.datasets.blended_megatron_dataset_builder
        import megatron.core.datasets.gpt_dataset
        import megatron.core.datasets.indexed_dataset
    return megatron.core.datasets


@contextlib.contextmanager
def _process_group():
    """Megatron's dataset builders call torch.distributed (rank, barrier) unconditionally: give a
    single process a world of one while they run."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_prefix(prefix: str | Path) -> tuple[int, int]:
    """PREFIX.bin and PREFIX.idx exist and agree on the number of tokens; returns (tokens, documents)."""
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    for path in (bin_path, idx_path):
        if not path.is_file():
            raise ConfigError(
                f"data.prefixes: {path} does not exist "
                "(prepare corpora with python -m moe_train.tools.prepare_data)"
            )
    try:
        index = megatron_datasets().indexed_dataset._IndexReader(str(idx_path), multimodal=False)
    except Exception as e:  # a truncated or foreign .idx
        raise ConfigError(f"{idx_path} is not a valid index: {e}") from None
    expected = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
    actual = bin_path.stat().st_size
    if actual != expected:
        raise ConfigError(
            f"{bin_path} ({actual:,} bytes) does not match {idx_path} (which describes {expected:,} bytes); "
            "prepare the corpus again"
        )
    return int(index.sequence_lengths.sum()), len(index.sequence_lengths)


def check_document_ends(
    prefix: str | Path, eos_id: int, eos_token: str, key: str, checked: int = 1000
) -> None:
    """`key` (data.document_mask, say) reads documents' ends from their end-of-document tokens: a
    corpus whose first `checked` documents all end without one has none (prepared without them,
    e.g. megatron's preprocess_data without --append-eod) and is refused."""
    index = megatron_datasets().indexed_dataset._IndexReader(f"{prefix}.idx", multimodal=False)
    last_sequences = index.document_indices[1 : checked + 1] - 1  # each document's last sequence
    ends = (
        index.sequence_pointers[last_sequences] // index.dtype_size
        + index.sequence_lengths[last_sequences]
        - 1
    )
    tokens = np.memmap(f"{prefix}.bin", dtype=index.dtype, mode="r")
    if ends.size and not (tokens[ends] == eos_id).any():
        raise ConfigError(
            f"{key}=true needs end-of-document tokens, and no document of {prefix} ends with the "
            f"tokenizer's {eos_token} (id {eos_id}): prepare it with python -m "
            "moe_train.tools.prepare_data, which ends every document with one"
        )


def _validation_documents(documents: int, split: str) -> int:
    """How many of a corpus's documents megatron's split gives to validation (its rule: split point
    k of n documents at round(cumulative weight k x n)). Checked before megatron builds anything,
    since with none it would loop forever looking for validation tokens."""
    n = documents
    weights = [float(w) for w in split.split(",")]
    train_end, val_end = (sum(weights[: i + 1]) / sum(weights) for i in (0, 1))
    return round(val_end * n) - round(train_end * n)


def _drop_unreadable_caches(cache_dir: Path) -> None:
    """Megatron loads an index cache whose files all exist, and writes them in place: a process
    killed while writing one leaves an .npy cut short, which would fail every later start. Delete
    each cache (the files whose names agree up to the last '-') with an .npy that does not read
    back as megatron reads it, so that it is built again."""
    if not cache_dir.is_dir():
        return
    for path in sorted(cache_dir.glob("*.npy")):
        try:
            if path.exists():  # not deleted with an earlier file of its cache
                np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            log.warning(
                "the index cache %s does not read back (%s; left by a run killed while writing it?): "
                "building it again",
                path, first_line(e),
            )  # fmt: skip
            for stale in cache_dir.glob(glob.escape(path.name.rsplit("-", 1)[0]) + "-*"):
                stale.unlink(missing_ok=True)


class _TokenizerInfo:
    """What GPTDataset asks of a tokenizer: the vocabulary size and the end-of-document id."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size = vocab_size
        self.eod = eod
        self.unique_identifiers = {"vocab_size": vocab_size, "eod": eod}  # part of the index cache key


class GPTSamples:
    """A GPTDataset (or blend) as (count, seq_len + 1) windows: inputs and next-token targets.
    Each batch's ids are checked against the tokenizer's vocabulary: data prepared with another
    tokenizer would otherwise fail deep in the embedding (a device-side assert on a GPU)."""

    def __init__(self, dataset, vocab_size: int):
        self.dataset = dataset
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return len(self.dataset)

    def samples(self, start: int, count: int) -> torch.Tensor:
        if start + count > len(self.dataset):
            raise IndexError(
                f"samples {start}..{start + count} requested from a dataset of {len(self.dataset)}"
            )
        rows = []
        for i in range(start, start + count):
            sample = self.dataset[i]
            rows.append(torch.cat([sample["tokens"], sample["labels"][-1:]]))
        batch = torch.stack(rows)
        if int(batch.max()) >= self.vocab_size:
            raise ConfigError(
                f"token id {int(batch.max())} in the data is outside the tokenizer's vocabulary of "
                f"{self.vocab_size}: the corpus was prepared with another tokenizer (data.tokenizer)"
            )
        return batch


def build_gpt_datasets(
    prefixes: list[str],
    weights: list[float] | None,
    split: str,
    seq_len: int,
    seed: int,
    vocab_size: int,
    eos_id: int,
    num_train: int,
    num_valid: int,
    cache_dir: Path,
) -> tuple[GPTSamples, GPTSamples]:
    """Train and validation samples of the blend; every prefix is checked first.

    Megatron's builder splits each corpus's documents by the `split` weights, shuffles from the seed
    and caches the sample indices in cache_dir (rank 0 builds them, the other ranks load them); a
    cache that a killed process left cut short is built again."""
    tokens, documents = zip(*(check_prefix(prefix) for prefix in prefixes))
    for prefix, count in zip(prefixes, documents):
        if _validation_documents(count, split) == 0:
            raise ConfigError(
                f"data.split={split!r} leaves no validation documents in {prefix} (a corpus of "
                f"{count} documents): give validation a larger share, e.g. data.split='80,20,0'"
            )
    # Without weights megatron would concatenate one epoch of each corpus whatever size we ask for;
    # weights in proportion to the corpora's tokens sample the same mix for as long as we ask.
    weights = list(weights or tokens)
    datasets = megatron_datasets()
    config = datasets.gpt_dataset.GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=(list(prefixes), [float(w) for w in weights]),
        split=split,
        path_to_cache=str(cache_dir),
        tokenizer=_TokenizerInfo(vocab_size, eos_id),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    builder = datasets.blended_megatron_dataset_builder.BlendedMegatronDatasetBuilder(
        datasets.gpt_dataset.GPTDataset, [num_train, num_valid, 0], lambda: True, config
    )
    with _process_group():
        if dist.get_rank() == 0:  # the rank that builds them; the others load them after it
            _drop_unreadable_caches(cache_dir)
        train, valid, _ = builder.build()
    if train is None or valid is None or len(valid) < num_valid:
        raise ConfigError(f"data.split={split!r} leaves no validation documents in {', '.join(prefixes)}")
    return GPTSamples(train, vocab_size), GPTSamples(valid, vocab_size)
