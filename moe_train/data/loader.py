"""Packed sequences and the shuffled training stream, addressed by global sample index.

The stream is a pure function of (seed, sample index): epoch e is a seeded permutation of all
sequences, so the data position is one integer (samples consumed) and a resumed run, or a run with
more ranks, reads exactly the samples an uninterrupted single-process run would.
"""

from __future__ import annotations

import torch

from moe_train.config import ConfigError, DataConfig
from moe_train.data.stdlib import load_stdlib_corpus
from moe_train.data.tokenizer import ByteTokenizer


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

    def evenly_spaced(self, count: int) -> torch.Tensor:
        """count sequences spread over the whole split (wrapping if count exceeds it)."""
        return self.get(torch.arange(count) * max(1, len(self) // count) % len(self))


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


def build_datasets(config: DataConfig) -> tuple[ByteTokenizer, dict[str, PackedSequences]]:
    tokenizer = ByteTokenizer()
    corpus = load_stdlib_corpus(config.val_fraction, tokenizer.eos_id)
    splits = {
        split: PackedSequences(torch.from_numpy(tokens.copy()), config.seq_len, split)
        for split, tokens in corpus.items()
    }
    return tokenizer, splits
