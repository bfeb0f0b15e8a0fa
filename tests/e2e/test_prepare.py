"""Prepared corpora end to end: prepare -> IndexedDataset -> text again; blends, splits, resume, errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_train.config import ConfigError
from moe_train.data.indexed import build_gpt_datasets, check_prefix, megatron_datasets
from moe_train.data.prepare import prepare
from moe_train.data.tokenizer import HFTokenizer
from moe_train.tools.hydra_config import compose_config
from moe_train.train.checkpoint import load_config, resolve_checkpoint
from moe_train.train.metrics import read_metrics
from moe_train.train.trainer import run
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]


def documents(n, word):
    return [
        f"{word} document {i}: " + " ".join(f"{word}{j % 7}" for j in range(i % 13 + 20)) + "\n"
        for i in range(n)
    ]


def jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two prepared corpora sharing one BPE: 'alpha' (100 documents) and 'beta' (60)."""
    root = tmp_path_factory.mktemp("corpora")
    alpha = jsonl(root / "src" / "alpha.jsonl", documents(100, "alpha"))
    beta = jsonl(root / "src" / "beta.jsonl", documents(60, "beta"))
    trained = prepare([alpha, beta], root / "both" / "both", vocab_size=400, workers=2, progress=False)
    prepare([alpha], root / "alpha" / "alpha", tokenizer=trained.tokenizer, workers=1, progress=False)
    prepare([beta], root / "beta" / "beta", tokenizer=trained.tokenizer, workers=2, progress=False)
    return root, trained


def read_back(prefix, tokenizer):
    dataset = megatron_datasets().indexed_dataset.IndexedDataset(str(prefix))
    return [tokenizer.decode(dataset[i].tolist()) for i in range(len(dataset))], dataset


def test_round_trip_text_prepare_dataset_text(corpora):
    root, trained = corpora
    tokenizer = HFTokenizer(trained.tokenizer)
    texts, dataset = read_back(root / "both" / "both", tokenizer)
    assert texts == documents(100, "alpha") + documents(60, "beta")
    assert all(dataset[i][-1] == tokenizer.eos_id for i in range(len(dataset)))  # end-of-document token
    assert trained.documents == 160 and trained.dtype == "uint16" and trained.engine == "tiktoken"
    assert trained.tokens == sum(len(dataset[i]) for i in range(len(dataset)))
    # 1 worker and 2 workers write the same bytes
    one = prepare(
        [root / "src" / "alpha.jsonl"],
        root / "one" / "a",
        tokenizer=trained.tokenizer,
        workers=1,
        progress=False,
    )
    assert Path(f"{one.prefix}.bin").read_bytes() == Path(f"{root}/alpha/alpha.bin").read_bytes()


def test_a_user_tokenizer_tiktoken_cannot_reproduce_is_encoded_by_tokenizers(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    gpt2 = Tokenizer(models.BPE())
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex
    gpt2.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    gpt2.train_from_iterator(
        documents(50, "delta"),
        trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], initial_alphabet=alphabet),
    )
    gpt2.save(str(tmp_path / "tokenizer.json"))
    texts = documents(40, "delta") + ["", "é 😀\n\n  x"]
    source = jsonl(tmp_path / "src.jsonl", texts)
    result = prepare(
        [source], tmp_path / "d", tokenizer=tmp_path / "tokenizer.json", workers=2, progress=False
    )
    assert result.engine == "tokenizers"
    tokenizer = HFTokenizer(tmp_path / "tokenizer.json")
    decoded, dataset = read_back(tmp_path / "d", tokenizer)
    assert decoded == texts
    assert [dataset[i].tolist() for i in range(len(dataset))] == [
        [*tokenizer.encode(t), tokenizer.eos_id] for t in texts
    ]


def build(root, prefixes, weights=None, split="80,20,0", num_train=400, num_valid=40, seed=1):
    tokenizer = HFTokenizer(root / "both" / "tokenizer.json")
    return build_gpt_datasets(
        [str(root / p) for p in prefixes],
        weights,
        split,
        32,
        seed,
        tokenizer.vocab_size,
        tokenizer.eos_id,
        num_train,
        num_valid,
        root / "indices",
    ), tokenizer


def test_blend_follows_the_weights(corpora):
    root, _ = corpora
    (train, _), tokenizer = build(root, ["alpha/alpha", "beta/beta"], weights=[0.75, 0.25], num_train=2000)
    texts = [tokenizer.decode(row.tolist()) for row in train.samples(0, 2000)]
    alpha = sum("alpha" in t and "beta" not in t for t in texts) / len(texts)
    assert alpha == pytest.approx(0.75, abs=0.03)


def test_validation_split_holds_the_last_documents_and_never_meets_training(corpora):
    root, _ = corpora
    (train, valid), tokenizer = build(root, ["alpha/alpha"], split="80,20,0", num_train=500, num_valid=60)
    seen = lambda samples: {  # noqa: E731
        int(n) for row in samples for n in re.findall(r"document (\d+):", tokenizer.decode(row.tolist()))
    }
    train_docs, valid_docs = seen(train.samples(0, 500)), seen(valid.samples(0, 60))
    assert valid_docs and valid_docs <= set(range(80, 100))
    assert train_docs <= set(range(0, 80)) and len(train_docs) > 70


def test_the_sample_stream_is_deterministic_so_resume_continues_it(corpora):
    root, _ = corpora
    (first, _), _ = build(root, ["alpha/alpha", "beta/beta"], num_train=300)
    (again, _), _ = build(root, ["alpha/alpha", "beta/beta"], num_train=300)
    assert torch.equal(torch.cat([again.samples(0, 100), again.samples(100, 200)]), first.samples(0, 300))
    (other_seed, _), _ = build(root, ["alpha/alpha", "beta/beta"], num_train=300, seed=2)
    assert not torch.equal(other_seed.samples(0, 50), first.samples(0, 50))


def indexed_overrides(root, out_dir, *extra):
    overrides = [o for o in TINY if not o.startswith("data=")]
    return [
        *overrides,
        "data=indexed",
        f"data.prefixes=[{root}/alpha/alpha,{root}/beta/beta]",
        f"data.tokenizer={root}/both/tokenizer.json",
        f"data.cache_dir={root}/cache",
        f"trainer.out_dir={out_dir}",
        *extra,
    ]


def test_training_on_prepared_corpora_resumes_exactly(corpora, tmp_path):
    root, _ = corpora
    steps = ["trainer.max_steps=6", "trainer.eval_every=3", "trainer.ckpt_every=0", "trainer.num_samples=0"]
    run(compose_config(indexed_overrides(root, tmp_path / "whole", *steps)))
    run(compose_config(indexed_overrides(root, tmp_path / "split", *steps, "trainer.exit_after_steps=3")))
    config = compose_config(indexed_overrides(root, tmp_path / "split", *steps))
    run(config)
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert [(m["step"], m["loss"]) for m in split] == [(m["step"], m["loss"]) for m in whole]
    saved = load_config(resolve_checkpoint(tmp_path / "split"))
    assert saved.model.vocab_size == 400 and config.model.vocab_size is None  # followed the tokenizer
    assert whole[-1]["val_loss_per_byte"] < whole[-1]["val_loss"]  # several bytes per token


def test_a_bin_that_does_not_match_its_idx_is_refused(corpora, tmp_path):
    root, _ = corpora
    broken = tmp_path / "broken"
    broken.with_suffix(".idx").write_bytes((root / "alpha" / "alpha.idx").read_bytes())
    broken.with_suffix(".bin").write_bytes((root / "alpha" / "alpha.bin").read_bytes()[:-10])
    with pytest.raises(ConfigError, match=r"broken.bin \(.* bytes\) does not match .*broken.idx"):
        check_prefix(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        check_prefix(tmp_path / "missing")


def test_tokenizer_larger_than_the_model_is_refused(corpora, tmp_path):
    root, _ = corpora
    with pytest.raises(
        ConfigError, match=r"model.vocab_size=300 is smaller than the tokenizer's vocabulary \(400\)"
    ):
        run(compose_config(indexed_overrides(root, tmp_path, "model.vocab_size=300")))


def test_data_prepared_with_another_tokenizer_is_refused_at_its_first_batch(corpora):
    root, _ = corpora
    (train, _), tokenizer = build(root, ["both/both"])
    train.vocab_size = 300  # as if data.tokenizer named a smaller tokenizer than the corpus's (400)
    with pytest.raises(
        ConfigError, match="token id 3.. in the data is outside the tokenizer's vocabulary of 300"
    ):
        train.samples(0, 64)


def test_an_output_prefix_that_is_a_folder_is_refused(tmp_path, capsys):
    from moe_train.tools.prepare_data import main

    source = jsonl(tmp_path / "src.jsonl", documents(3, "x"))
    (tmp_path / "data").mkdir()
    for output in (f"{tmp_path / 'data'}", f"{tmp_path / 'new'}/"):
        with pytest.raises(SystemExit) as exit_:
            main([str(source), "--output", output, "--vocab-size", "300"])
        assert exit_.value.code == 2
        assert "is a folder; give a prefix inside it" in capsys.readouterr().err
    assert list((tmp_path / "data").iterdir()) == []


def test_weights_must_match_prefixes():
    with pytest.raises(ConfigError, match="data.weights has 1 entries but data.prefixes has 2"):
        compose_config(["data=indexed", "data.prefixes=[a,b]", "data.weights=[1.0]"])


def test_failed_preparation_leaves_nothing_behind(tmp_path):
    source = jsonl(tmp_path / "src.jsonl", ["fine"] * 3)
    with source.open("a") as f:
        f.write(json.dumps({"title": "no text"}) + "\n")
    with pytest.raises(ConfigError, match="no text field"):
        prepare([source], tmp_path / "out" / "x", vocab_size=300, on_missing="fail", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="empty corpus"):
        prepare([tmp_path / "empty.jsonl"], tmp_path / "out2" / "y", vocab_size=300, progress=False)
    assert not any(p.suffix in (".bin", ".idx") for p in (tmp_path / "out2").iterdir())


def test_a_corpus_too_small_for_the_split_is_refused_not_a_hang(corpora, tmp_path):
    """beta's 60 documents at 995,5,0 give validation round(60) - round(59.7) = 0 documents:
    megatron would look for validation tokens forever."""
    root, _ = corpora
    with pytest.raises(ConfigError, match=r"data.split='995,5,0' leaves no validation documents in .*beta "
                       r"\(a corpus of 60 documents\)"):  # fmt: skip
        build(root, ["beta/beta"], split="995,5,0")


def test_a_trained_bpe_never_replaces_the_tokenizer_of_corpora_already_there(corpora, tmp_path):
    root, trained = corpora
    folder = tmp_path / "shared"
    source = jsonl(tmp_path / "src.jsonl", documents(30, "gamma"))
    first = prepare([source], folder / "one", vocab_size=300, progress=False)
    before = first.tokenizer.read_bytes()
    with pytest.raises(ConfigError, match="is the tokenizer of one.idx: a BPE trained now would replace it"):
        prepare([source], folder / "two", vocab_size=400, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(ConfigError):  # a failed run of the same prefix leaves its tokenizer as it was
        prepare([bad], folder / "one", vocab_size=400, on_missing="fail", progress=False)
    assert first.tokenizer.read_bytes() == before
    again = prepare([source], folder / "one", vocab_size=280, progress=False)  # the same prefix again: fine
    assert HFTokenizer(again.tokenizer).vocab_size == 280


def test_the_bpe_trainer_sees_long_lines_in_pieces():
    from moe_train.data.tokenizer import WORD_LIMIT, _bounded_words

    text = "short line\n" + "x" * (2 * WORD_LIMIT + 5) + "\nend"
    pieces = list(_bounded_words(["small", text]))
    assert pieces[0] == "small" and "".join(pieces[1:]) == text
    assert max(map(len, pieces)) == WORD_LIMIT


def test_cli_prepares_and_reports(tmp_path):
    jsonl(tmp_path / "in" / "part1.jsonl", documents(30, "gamma"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_train.tools.prepare_data",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out" / "g"),
            "--vocab-size",
            "300",
            "--workers",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "30 documents (0 skipped)" in result.stdout and "MB/s" in result.stdout
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "g.idx").is_file()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_train.tools.prepare_data",
            str(tmp_path / "nope"),
            "--output",
            str(tmp_path / "o"),
            "--vocab-size",
            "300",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: input {tmp_path / 'nope'} does not exist"


def test_default_stdlib_corpus_is_prepared_once_and_trains(tmp_path):
    overrides = [o for o in TINY if not o.startswith("data=")]
    config = compose_config(
        [
            *overrides,
            "data=stdlib",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.vocab_size=512",
            f"trainer.out_dir={tmp_path / 'run'}",
            "trainer.max_steps=2",
            "trainer.eval_every=2",
        ]
    )
    run(config)
    prepared = list((tmp_path / "cache").glob("stdlib-py*-bpe512/stdlib.idx"))
    assert len(prepared) == 1
    assert read_metrics(tmp_path / "run")[-1]["val_loss_per_byte"] > 0
