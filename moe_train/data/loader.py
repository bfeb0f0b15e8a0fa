"""What the trainer reads: a tokenizer and train / validation samples addressed by global index.
Each sample is a pure function of (seed, index), so a resumed run, or one with more ranks, reads the
samples one uninterrupted process would, and the data position is one integer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from moe_train.config import Config, ConfigError, DataConfig
from moe_train.data.indexed import build_gpt_datasets, check_document_ends, check_prefix
from moe_train.data.stdlib import load_stdlib_bytes, prepare_stdlib
from moe_train.data.tokenizer import ByteTokenizer, HFTokenizer
from moe_train.parallel.topology import Topology


class Samples(Protocol):
    def samples(self, start: int, count: int) -> torch.Tensor:
        """Samples [start, start + count) as (count, seq_len + 1) int64 token windows."""
        ...


class PackedSequences:
    """A token array cut into non-overlapping windows of seq_len + 1 (inputs and shifted targets)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, name: str):
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_sequences = (tokens.numel() - 1) // seq_len
        if self.num_sequences < 1:
            raise ConfigError(
                f"the {name} split has {tokens.numel()} tokens, too few for data.seq_len={seq_len}"
            )

    def __len__(self) -> int:
        return self.num_sequences

    def get(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (n,) -> (n, seq_len + 1) int64."""
        starts = indices * self.seq_len  # (n,)
        offsets = torch.arange(self.seq_len + 1)  # (T + 1,)
        return self.tokens[starts[:, None] + offsets].long()


class TrainBatches:
    """The endless shuffled stream of training sequences: sample g lies in epoch g // len(data)."""

    def __init__(self, data: PackedSequences, seed: int):
        self.data = data
        self.seed = seed
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.data), generator=generator)
            self._epoch = epoch
        return self._perm

    def samples(self, start: int, count: int) -> torch.Tensor:
        """Global samples [start, start + count) -> (count, seq_len + 1) int64."""
        n = len(self.data)
        indices = torch.empty(count, dtype=torch.long)
        for i, g in enumerate(range(start, start + count)):
            indices[i] = self._permutation(g // n)[g % n]
        return self.data.get(indices)


def tokenizer_vocab_size(config: Config) -> int:
    """The vocabulary the data's tokenizer will have, without preparing anything (for counting)."""
    data = config.data
    if data.name == "stdlib_bytes":
        return ByteTokenizer.vocab_size
    if data.name == "stdlib":
        return data.vocab_size
    return HFTokenizer(data.tokenizer or Path(data.prefixes[0]).parent / "tokenizer.json").vocab_size


@dataclass
class Datasets:
    tokenizer: ByteTokenizer | HFTokenizer
    train: Samples  # sample g of the run's training stream
    val: Samples  # the validation samples, the same ones at every evaluation


def _indexed_tokenizer(data: DataConfig) -> Path:
    """data=indexed: data.tokenizer, or the tokenizer.json beside the first corpus."""
    return Path(data.tokenizer) if data.tokenizer else Path(data.prefixes[0]).parent / "tokenizer.json"


def tokenizer_file(data: DataConfig) -> Path | None:
    """The tokenizer.json that `data` is tokenized with, if it is on this machine: data.tokenizer, or
    the one beside the first corpus (data=indexed), or the prepared stdlib corpus's. None for the
    byte-level stream, which has none."""
    if data.name == "indexed":
        path = _indexed_tokenizer(data)
        return path if path.is_file() else None
    if data.name == "stdlib":
        found = sorted(
            Path(data.cache_dir).expanduser().glob(f"stdlib-py*-bpe{data.vocab_size}/tokenizer.json")
        )
        return found[-1] if found else None
    return None


def load_tokenizer(data: DataConfig) -> ByteTokenizer | HFTokenizer:
    """The tokenizer `data` is tokenized with (a checkpoint's, for sampling from it)."""
    if data.name == "stdlib_bytes":
        return ByteTokenizer()
    path = tokenizer_file(data)
    if path is None:
        where = (
            _indexed_tokenizer(data) if data.name == "indexed" else f"under data.cache_dir={data.cache_dir}"
        )
        raise ConfigError(f"the tokenizer of data={data.name} is not on this machine ({where})")
    return HFTokenizer(path)


def build_datasets(config: Config, topology: Topology) -> Datasets:
    """The tokenizer and the train / validation samples that `config.data` names: prepared corpora
    through megatron-core's GPTDataset (indexed.py), the byte-level stream through TrainBatches."""
    data, t = config.data, config.trainer
    if data.name == "stdlib_bytes":
        tokenizer = ByteTokenizer()
        corpus = load_stdlib_bytes(data.val_fraction, tokenizer.eos_id)
        train, val = (
            PackedSequences(torch.from_numpy(corpus[s].copy()), data.seq_len, s) for s in ("train", "val")
        )
        return Datasets(tokenizer, TrainBatches(train, t.seed), TrainBatches(val, t.seed + 1))

    cache_dir = Path(data.cache_dir).expanduser()
    if data.name == "stdlib":
        if topology.local_rank == 0:  # once per node; the others wait, then find it cached
            prepare_stdlib(cache_dir, data.vocab_size)
        topology.barrier("barrier (preparing the stdlib corpus)")
        prefix, tokenizer_path = prepare_stdlib(cache_dir, data.vocab_size)
        prefixes, weights = [str(prefix)], None
    else:
        prefixes, weights = data.prefixes, data.weights
        for prefix in prefixes:  # a missing corpus is the mistake to name, not its tokenizer
            if not (Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()):
                check_prefix(prefix)  # raises, naming the missing file
        tokenizer_path = _indexed_tokenizer(data)
    tokenizer = HFTokenizer(tokenizer_path)
    if data.separates_documents:  # stdlib_bytes ends every file with its marker
        key = next(k for k in ("document_mask", "reset_positions", "eod_mask_loss") if getattr(data, k))
        for prefix in prefixes:
            check_prefix(prefix)
            check_document_ends(prefix, tokenizer.eos_id, tokenizer.eos_token, f"data.{key}")
    train, val = build_gpt_datasets(
        prefixes,
        weights,
        data.split,
        data.seq_len,
        t.seed,
        tokenizer.vocab_size,
        tokenizer.eos_id,
        num_train=t.max_steps * t.global_batch_size,
        num_valid=t.eval_batches * t.global_batch_size,
        cache_dir=cache_dir / "indices",
    )
    return Datasets(tokenizer, train, val)
