"""tiktoken as the encoder of our line-level BPEs: token for token what `tokenizers` gives (the
reference), and `tokenizers` itself wherever that cannot be proven."""

import json
import random
import time

import numpy as np
import pytest
import tiktoken
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from moe_train.data.stdlib import stdlib_files
from moe_train.data.tiktoken_bpe import LINE_PATTERN, TiktokenBPE, bytes_to_unicode
from moe_train.data.tokenizer import EOS_TOKEN, HFTokenizer, train_bpe

ADVERSARIAL = [
    "",
    "\n",
    "\n\n\n",
    " " * 3000,
    "\t \r\n \r" * 200,
    "x" * 20000,  # one long line: a single piece
    "😀" * 500 + "\n",
    "🇫🇷👩‍👩‍👧 中文 é\u0301 \u2028\u3000\ufeff\ufffd \U0010ffff\n",
    "\x00\x01\x7f\x80\n",
    EOS_TOKEN,
    f"a{EOS_TOKEN}b\n{EOS_TOKEN}{EOS_TOKEN}",  # the end-of-document text inside a document
    "<|endoftext",
    "def f(x):\n    return x  # no final newline",
]


@pytest.fixture(scope="module")
def corpus():
    _, files = stdlib_files()
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files[:300]]
    return texts[:60], texts[60:]  # (to train on, to compare on)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    return train_bpe(corpus[0], 1000, tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def reference(tokenizer: HFTokenizer, texts):
    return [e.ids for e in tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False)]


def random_texts(n, rng, alphabet, max_len):
    return ["".join(rng.choice(alphabet) for _ in range(rng.randrange(max_len))) for _ in range(n)]


def test_trained_bpe_encodes_as_tokenizers_does(trained, corpus):
    assert trained.tiktoken is not None  # train_bpe's pre-tokenizer is the one tiktoken reproduces
    rng = random.Random(0)
    alphabet = [chr(c) for c in (*range(128), 0xE9, 0x3000, 0x4E2D, 0x1F600, 0x200D, 0x10FFFF)]
    texts = corpus[1] + ADVERSARIAL + random_texts(200, rng, alphabet, 300)
    assert sum(map(len, corpus[1])) > 500_000
    mismatched = [
        t for t, ids in zip(texts, reference(trained, texts)) if trained.tiktoken.encode(t).tolist() != ids
    ]
    assert mismatched == []
    for text in ADVERSARIAL:  # and the ids give the text back
        assert (
            trained.tokenizer.decode(trained.tiktoken.encode(text).tolist(), skip_special_tokens=False)
            == text
        )


def test_a_long_line_takes_linear_time(trained):
    line = "ab c" * 50_000  # 200 kB without a newline: one piece; tiktoken < 0.13 takes quadratic time
    start = time.perf_counter()
    ids = trained.tiktoken.encode(line)
    assert time.perf_counter() - start < 2.0
    assert ids.tolist() == reference(trained, [line])[0]


def test_encode_documents_appends_the_end_of_document_token(trained):
    texts = ["def f():\n    pass\n", "", EOS_TOKEN, "é"]
    ids, lengths = trained.encode_documents(texts)
    expected = [[*doc, trained.eos_id] for doc in reference(trained, texts)]
    assert lengths.tolist() == [len(doc) for doc in expected]
    assert ids.tolist() == [i for doc in expected for i in doc]
    ids, lengths = trained.encode_documents([])
    assert ids.size == lengths.size == 0


def line_tokenizer(path, merges):
    """A tokenizer.json like train_bpe's with the given merges over the byte alphabet."""
    to_char = bytes_to_unicode()
    full = {EOS_TOKEN: 0, **{to_char[b]: b + 1 for b in range(256)}}
    for left, right in merges:
        full.setdefault(left + right, len(full))
    tokenizer = Tokenizer(models.BPE(full, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", "merged_with_previous"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.add_special_tokens([EOS_TOKEN])
    tokenizer.save(str(path))
    return HFTokenizer(path)


def raw_tiktoken(tokenizer: HFTokenizer):
    """tiktoken with rank = merge position and no check: what a naive conversion would do."""
    spec = json.loads(tokenizer.path.read_text())
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks, ids = {bytes([b]): b for b in range(256)}, [b + 1 for b in range(256)]
    for left, right in spec["model"]["merges"]:
        ranks[bytes(to_byte[c] for c in left + right)] = len(ids)
        ids.append(spec["model"]["vocab"][left + right])
    encoding = tiktoken.Encoding("raw", pat_str=LINE_PATTERN, mergeable_ranks=ranks, special_tokens={})
    return lambda text: np.array(ids)[encoding.encode_to_numpy(text)].tolist()


def test_merges_tiktoken_would_apply_differently_fall_back_to_tokenizers(tmp_path):
    # "bc" is merged before "ab", so `tokenizers` never reaches (ab, c) in "abc"; tiktoken joins a|bc
    tokenizer = line_tokenizer(tmp_path / "t.json", [("b", "c"), ("a", "b"), ("ab", "c")])
    expected = reference(tokenizer, ["abc"])[0]
    assert len(expected) == 2 and len(raw_tiktoken(tokenizer)("abc")) == 1
    assert tokenizer.tiktoken is None
    assert tokenizer.encode_documents(["abc"])[0].tolist() == [*expected, tokenizer.eos_id]


def test_random_merge_lists_are_either_proven_or_refused(tmp_path):
    rng = random.Random(0)
    outcomes = {"proven": 0, "refused and raw tiktoken differs": 0}
    for n in range(80):
        merges, tokens = [], ["a", "b", "c"]
        while len(merges) < rng.randrange(3, 30):
            left, right = rng.choice(tokens), rng.choice(tokens)
            if left + right not in tokens and len(left + right) <= 8:
                merges.append((left, right))
                tokens.append(left + right)
        tokenizer = line_tokenizer(tmp_path / f"{n}.json", merges)
        texts = random_texts(100, rng, "abc\n", 40)
        expected = reference(tokenizer, texts)
        if tokenizer.tiktoken is not None:
            outcomes["proven"] += 1
            assert [tokenizer.tiktoken.encode(t).tolist() for t in texts] == expected, merges
        elif list(map(raw_tiktoken(tokenizer), texts)) != expected:
            outcomes["refused and raw tiktoken differs"] += 1
    assert min(outcomes.values()) >= 10, outcomes  # both kinds occur: the check is exercised


def test_other_pre_tokenizers_and_normalizers_use_tokenizers(tmp_path, corpus):
    gpt2 = Tokenizer(models.BPE())
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    gpt2.train_from_iterator(corpus[0][:20], trainer)
    gpt2.save(str(tmp_path / "gpt2.json"))
    tokenizer = HFTokenizer(tmp_path / "gpt2.json")
    assert tokenizer.tiktoken is None
    assert tokenizer.encode_documents(["def f():\n"])[0].tolist() == [*tokenizer.encode("def f():\n"), 0]

    spec = json.loads(line_tokenizer(tmp_path / "t.json", [("a", "b")]).path.read_text())
    assert TiktokenBPE.load(tmp_path / "t.json") is not None
    spec["normalizer"] = {"type": "Lowercase"}
    (tmp_path / "lower.json").write_text(json.dumps(spec))
    assert TiktokenBPE.load(tmp_path / "lower.json") is None


def test_a_bpe_that_runs_out_of_merges_says_so(tmp_path, caplog):
    """A short sample has fewer pairs than the vocabulary asks for: the BPE is smaller, with a warning."""
    small = train_bpe(["abab abab\n"] * 3, 1000, tmp_path / "tokenizer.json")
    assert small.vocab_size < 1000
    assert f"the BPE has {small.vocab_size} tokens, not the 1000 asked for" in caplog.text
