"""The embedded corpus, the split and the resumable sample stream."""

import torch

from moe_train.config import DataConfig
from moe_train.data import ByteTokenizer, PackedSequences, TrainBatches, build_datasets
from moe_train.data.stdlib import is_validation


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'é' * x\n"
    assert tok.decode(tok.encode(text)) == text


def test_split_is_by_file_and_deterministic():
    names = [f"pkg/mod_{i}.py" for i in range(2000)]
    val = [n for n in names if is_validation(n, 0.05)]
    assert val == [n for n in names if is_validation(n, 0.05)]
    assert 50 < len(val) < 150  # about 5 %


def test_stdlib_corpus_splits_are_disjoint_text():
    tokenizer, splits = build_datasets(DataConfig(seq_len=64))
    assert len(splits["train"]) > 50 * len(splits["val"]) / 5
    sample = tokenizer.decode(splits["train"].get(torch.tensor([0]))[0].tolist())
    assert sample.isprintable() or "\n" in sample


def test_packed_sequences_windows_overlap_by_one_for_targets():
    data = PackedSequences(torch.arange(100, dtype=torch.uint8), seq_len=10, name="t")
    assert len(data) == 9
    assert data.get(torch.tensor([1]))[0].tolist() == list(range(10, 21))


def test_stream_is_a_pure_function_of_the_position():
    data = PackedSequences(torch.arange(1000) % 251, seq_len=10, name="t")
    a = TrainBatches(data, seed=3)
    whole = a.samples(0, 250)  # crosses two epochs of 99 sequences
    b = TrainBatches(data, seed=3)
    assert torch.equal(torch.cat([b.samples(0, 100), b.samples(100, 150)]), whole)
    # every epoch is a permutation: each sequence once
    first_epoch = whole[:99, 0].tolist()
    assert sorted(first_epoch) == sorted(data.get(torch.arange(99))[:, 0].tolist())
    assert not torch.equal(TrainBatches(data, seed=4).samples(0, 20), whole[:20])
