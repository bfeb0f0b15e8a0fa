"""The byte-level stdlib stream, document sources, and the dtype rule of prepared corpora."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moe_train.config import ConfigError
from moe_train.data import ByteTokenizer, PackedSequences, TrainBatches
from moe_train.data.prepare import smallest_dtype
from moe_train.data.sources import DocumentReader, find_files
from moe_train.data.stdlib import is_validation, load_stdlib_bytes


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'é' * x\n"
    assert tok.decode(tok.encode(text)) == text


def test_split_is_by_file_and_deterministic():
    names = [f"pkg/mod_{i}.py" for i in range(2000)]
    val = [n for n in names if is_validation(n, 0.05)]
    assert val == [n for n in names if is_validation(n, 0.05)]
    assert 50 < len(val) < 150  # about 5 %


def test_stdlib_bytes_corpus_has_both_splits():
    corpus = load_stdlib_bytes(0.02, eos_id=0)
    assert corpus["train"].size > 20 * corpus["val"].size > 0
    assert corpus["train"].dtype == np.uint8


def test_packed_sequences_windows_overlap_by_one_for_targets():
    data = PackedSequences(torch.arange(100, dtype=torch.uint8), seq_len=10, name="t")
    assert len(data) == 9
    assert data.get(torch.tensor([1]))[0].tolist() == list(range(10, 21))


def test_stream_is_a_pure_function_of_the_position():
    data = PackedSequences(torch.arange(1000) % 251, seq_len=10, name="t")
    whole = TrainBatches(data, seed=3).samples(0, 250)  # crosses two epochs of 99 sequences
    b = TrainBatches(data, seed=3)
    assert torch.equal(torch.cat([b.samples(0, 100), b.samples(100, 150)]), whole)
    first_epoch = whole[:99, 0].tolist()  # every epoch is a permutation: each sequence once
    assert sorted(first_epoch) == sorted(data.get(torch.arange(99))[:, 0].tolist())
    assert not torch.equal(TrainBatches(data, seed=4).samples(0, 20), whole[:20])


def test_smallest_dtype_holds_the_vocabulary():
    assert smallest_dtype(256) == np.uint8
    assert smallest_dtype(257) == np.uint16
    assert smallest_dtype(65536) == np.uint16
    assert smallest_dtype(65537) == np.int32


def write_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "first record"})
        + "\n"
        + json.dumps({"body": "no text"})
        + "\nnot json\n"
        + json.dumps({"text": "second record"})
        + "\n"
    )
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "gzipped"}) + "\n")
    pq.write_table(pa.table({"text": ["row one", None, "row two"]}), tmp_path / "d.parquet")
    (tmp_path / "ignored.csv").write_text("a,b\n")


def test_sources_read_every_format_and_count_skipped_records(tmp_path):
    write_corpus(tmp_path)
    files = find_files([tmp_path])
    assert [f.name for f in files] == ["a.txt", "b.jsonl", "c.jsonl.gz", "d.parquet"]
    reader = DocumentReader(files)
    assert list(reader) == [
        "plain text document\n",
        "first record",
        "second record",
        "gzipped",
        "row one",
        "row two",
    ]
    assert (reader.stats.documents, reader.stats.skipped) == (6, 3)


def test_lone_surrogates_in_json_become_replacement_characters(tmp_path):
    """json.loads keeps an escaped lone surrogate, which has no UTF-8 form; a pair stays a character."""
    (tmp_path / "s.jsonl").write_text('{"text": "a\\ud800b \\ud83d\\ude00 \\udfff"}\n')
    reader = DocumentReader([tmp_path / "s.jsonl"])
    assert list(reader) == ["a\ufffdb \U0001f600 \ufffd"]
    assert reader.stats.bytes == len("a\ufffdb \U0001f600 \ufffd".encode())


def test_sources_fail_on_a_missing_field_when_asked(tmp_path):
    write_corpus(tmp_path)
    with pytest.raises(ConfigError, match=r"b.jsonl:2: no text field 'text'"):
        list(DocumentReader(find_files([tmp_path / "b.jsonl"]), on_missing="fail"))


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("cut.jsonl.gz", gzip.compress(b'{"text": "x"}\n' * 1000)[:60], "EOFError: Compressed file ended"),
        ("plain.jsonl.gz", b'{"text": "not compressed"}\n', "BadGzipFile: Not a gzipped file"),
        ("broken.parquet", b"PAR1 not a parquet file", "ArrowInvalid"),
    ],
)
def test_a_damaged_file_is_named_in_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigError, match=rf"^{tmp_path / name} cannot be read: {message}"):
        list(DocumentReader([tmp_path / name]))


@pytest.mark.parametrize(
    "inputs,message",
    [(["nope"], "input nope does not exist"), (["empty_dir"], "has no .txt"), (["x.csv"], "is not one of")],
)
def test_find_files_errors(tmp_path, monkeypatch, inputs, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ConfigError, match=message):
        find_files(inputs)
