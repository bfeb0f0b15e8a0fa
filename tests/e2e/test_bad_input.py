"""Bad inputs through the command line, one table: each is refused with a non-zero exit (2 for an
input mistake), no traceback, a message naming the culprit, and every file that was there before
left byte for byte as it was.

This table: 76 commands (25 in the default half, 51 more in the slow half): data and prepare_data 17,
checkpoints 13 (train.py, generate, export_hf), tools' arguments and outputs 29, Hugging Face
folders 7, config values through train.py 10. With the rest of the suite, about 290 bad inputs in all:
tests/unit/test_config.py 174 (124 numbers out of range, 50 bad values), tests/e2e/test_hf.py 14
(quantized, unsupported, bad rope scaling, routing it cannot express), tests/e2e/test_train.py about 9,
tests/e2e/test_faults.py about 9 (bad paths, preflight, full disk), tests/unit/test_tools.py 5
(generate's values, inspect's preset), tests/e2e/test_prepare.py 5 (prefix, bin/idx mismatch,
tokenizer size, another tokenizer, tiny split).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
BATCH = 8  # processes at once: they spend their time importing torch


def snapshot(root: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """One tiny trained run, its Hugging Face export, a prepared corpus, and damaged copies of each."""
    from moe_train.data.prepare import prepare

    ws = tmp_path_factory.mktemp("bad_input")
    trainers = [
        subprocess.Popen(
            [
                sys.executable,
                "train.py",
                *TINY,
                *model,
                "trainer.max_steps=2",
                f"trainer.out_dir={ws / name}",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, model in (("run", []), ("dense", ["model=dense_tiny", "trainer.eval_every=0"]))
    ]
    source = ws / "src.jsonl"
    source.write_text(
        "".join(json.dumps({"text": f"doc {i}: " + "word " * (i + 20)}) + "\n" for i in range(40))
    )
    prepare([source], ws / "corpus" / "c", vocab_size=300, workers=1, progress=False)
    prepare([source], ws / "small" / "s", vocab_size=260, workers=1, progress=False)
    for trainer in trainers:
        assert trainer.wait(timeout=120) == 0, trainer.stderr.read()
    ckpt = ws / "run" / "checkpoints" / "step_00000002"
    export = subprocess.run(
        [sys.executable, "-m", "moe_train.tools.export_hf", str(ws / "run"), str(ws / "hf")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0, export.stderr

    data = ws / "data"
    data.mkdir()
    corpus = ws / "corpus" / "c"
    (data / "trunc.idx").write_bytes(corpus.with_suffix(".idx").read_bytes())
    (data / "trunc.bin").write_bytes(corpus.with_suffix(".bin").read_bytes()[:-10])
    (data / "rand.idx").write_bytes(os.urandom(512))
    (data / "rand.bin").write_bytes(corpus.with_suffix(".bin").read_bytes())
    (data / "json.idx").write_text('{"not": "an index"}')
    (data / "json.bin").write_bytes(corpus.with_suffix(".bin").read_bytes())
    (data / "tokenizer.json").write_text("{ this is not json")
    (data / "weird.bin").write_bytes(os.urandom(256))  # an input prepare_data cannot read
    without_ends(corpus, data / "no_eod")
    tokenizer = json.loads((ws / "corpus" / "tokenizer.json").read_text())  # its marker renamed
    (data / "no_eos.json").write_text(json.dumps(tokenizer).replace("<|endoftext|>", "<|marker|>"))

    for name, damage in {
        "no_shard": lambda c: next(c.glob("*.distcp")).unlink(),
        "bad_metadata": lambda c: (c / ".metadata").write_bytes(os.urandom(200)),
        "empty_metadata": lambda c: (c / ".metadata").write_bytes(b""),
        "trunc_shard": lambda c: (lambda s: s.write_bytes(s.read_bytes()[:1000]))(next(c.glob("*.distcp"))),
        "no_config": lambda c: (c / "config.yaml").unlink(),
    }.items():
        copy = ws / "ckpts" / name
        shutil.copytree(ckpt, copy)
        damage(copy)

    hf = ws / "hf"
    for name in ("bad_json", "trunc_st", "no_shard", "no_config", "rand_st", "no_model_type", "bin_only"):
        shutil.copytree(hf, ws / "hfs" / name)
    (ws / "hfs" / "bad_json" / "config.json").write_text('{"model_type": "mixtral",')
    st = ws / "hfs" / "trunc_st" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:5000])
    (ws / "hfs" / "rand_st" / "model.safetensors").write_bytes(os.urandom(4096))
    (ws / "hfs" / "no_config" / "config.json").unlink()
    no_type = json.loads((hf / "config.json").read_text())
    del no_type["model_type"]
    (ws / "hfs" / "no_model_type" / "config.json").write_text(json.dumps(no_type))
    shutil.move(ws / "hfs" / "bin_only" / "model.safetensors", ws / "hfs" / "bin_only" / "pytorch_model.bin")
    sharded = ws / "hfs" / "no_shard"
    shutil.move(sharded / "model.safetensors", sharded / "model-00001-of-00002.safetensors")
    from safetensors import safe_open

    with safe_open(sharded / "model-00001-of-00002.safetensors", "pt") as f:
        keys = list(f.keys())
    weight_map = {k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )

    (ws / "taken").mkdir()
    (ws / "taken" / "keep.txt").write_text("keep")
    (ws / "a_file").write_text("keep")
    (ws / "plots" / "empty").mkdir(parents=True)
    (ws / "plots" / "garbage").mkdir()
    (ws / "plots" / "garbage" / "metrics.jsonl").write_bytes(os.urandom(300))
    return ws


def without_ends(corpus: Path, prefix: Path) -> None:
    """A copy of a prepared corpus with each document's end-of-document token left out (as
    megatron's preprocess_data writes without --append-eod)."""
    from moe_train.data.indexed import megatron_datasets

    indexed = megatron_datasets().indexed_dataset
    source = indexed.IndexedDataset(str(corpus))
    builder = indexed.IndexedDatasetBuilder(f"{prefix}.bin", dtype=source.index.dtype)
    for i in range(len(source)):
        builder.add_document(torch.from_numpy(source[i][:-1].astype("int64")), [len(source[i]) - 1])
    builder.finalize(f"{prefix}.idx")


def cases(ws: Path) -> list[tuple[str, list[str], str]]:
    """(name, command, what stderr must say)."""
    py = sys.executable
    run, dense, ckpts, hfs, corpus = ws / "run", ws / "dense", ws / "ckpts", ws / "hfs", ws / "corpus" / "c"

    def train(name, *overrides):
        return [
            py,
            "train.py",
            *TINY,
            "trainer.max_steps=3",
            f"trainer.out_dir={ws / 'out' / name}",
            *overrides,
        ]

    def indexed(name, prefix, tokenizer=f"{ws / 'corpus' / 'tokenizer.json'}", *overrides):
        kept = [o for o in TINY if not o.startswith("data=")]
        return [
            py, "train.py", *kept, "data=indexed", f"data.prefixes=[{prefix}]", f"data.tokenizer={tokenizer}",
            f"data.cache_dir={ws / 'out' / name / 'cache'}", "trainer.max_steps=2",
            f"trainer.out_dir={ws / 'out' / name}", *overrides,
        ]  # fmt: skip

    def tool(name, *args):
        return [py, "-m", f"moe_train.tools.{name}", *map(str, args)]

    table = [
        # data
        ("data: missing prefix", indexed("d1", ws / "corpus" / "nope"), "nope.bin does not exist"),
        ("data: truncated .bin", indexed("d2", ws / "data" / "trunc"), "trunc.bin"),
        ("data: random bytes as .idx", indexed("d3", ws / "data" / "rand"), "rand.idx"),
        ("data: JSON as .idx", indexed("d4", ws / "data" / "json"), "json.idx"),
        ("data: prefix is a folder", indexed("d5", ws / "corpus"), "corpus.bin does not exist"),
        ("data: tokenizer not JSON", indexed("d6", corpus, ws / "data" / "tokenizer.json"), "tokenizer.json"),
        ("data: tokenizer missing", indexed("d7", corpus, ws / "data" / "gone.json"), "gone.json"),
        (
            "data: another tokenizer",
            indexed("d8", corpus, ws / "small" / "tokenizer.json"),
            "outside the tokenizer's vocabulary of 260",
        ),
        ("data: document mask, no end-of-document tokens",
         indexed("d9", ws / "data" / "no_eod", f"{ws / 'corpus' / 'tokenizer.json'}", "data.document_mask=true"),
         "no document of"),
        ("data: document mask, a tokenizer without the token",
         indexed("d10", corpus, ws / "data" / "no_eos.json", "data.document_mask=true"), "no end-of-document token"),
        ("prepare: tokenizer not JSON", tool("prepare_data", ws / "src.jsonl", "--output", ws / "p1" / "x",
                                             "--tokenizer", ws / "data" / "tokenizer.json"), "tokenizer.json"),
        ("prepare: input of another format", tool("prepare_data", ws / "data" / "weird.bin", "--output",
                                                  ws / "p2" / "x", "--vocab-size", 300), "weird.bin"),
        ("prepare: --vocab-size 0", tool("prepare_data", ws / "src.jsonl", "--output", ws / "p3" / "x",
                                         "--vocab-size", 0), "vocab_size=0 must be at least 257"),
        ("prepare: --vocab-size -5", tool("prepare_data", ws / "src.jsonl", "--output", ws / "p4" / "x",
                                          "--vocab-size", -5), "vocab_size=-5 must be at least 257"),
        ("prepare: --workers 0", tool("prepare_data", ws / "src.jsonl", "--output", ws / "p5" / "x",
                                      "--vocab-size", 300, "--workers", 0), "--workers=0 must be >= 1"),
        ("prepare: --bpe-sample-mb nan", tool("prepare_data", ws / "src.jsonl", "--output", ws / "p6" / "x",
                                              "--vocab-size", 300, "--bpe-sample-mb", "nan"), "--bpe-sample-mb=nan"),
        ("prepare: output under a file", tool("prepare_data", ws / "src.jsonl", "--output", ws / "a_file" / "x",
                                              "--vocab-size", 300), "a_file"),
        # checkpoints
        ("ckpt: missing shard", train("c1", f"trainer.resume={ckpts / 'no_shard'}"), "no_shard"),
        ("ckpt: corrupt .metadata", train("c2", f"trainer.resume={ckpts / 'bad_metadata'}"), "bad_metadata"),
        ("ckpt: empty .metadata", train("c3", f"trainer.resume={ckpts / 'empty_metadata'}"), "empty_metadata"),
        ("ckpt: truncated shard", train("c4", f"trainer.resume={ckpts / 'trunc_shard'}"), "trunc_shard"),
        ("ckpt: no config.yaml", train("c5", f"trainer.resume={ckpts / 'no_config'}"), "no_config"),
        ("ckpt: resume a folder", train("c6", f"trainer.resume={ws / 'corpus'}"), "is not a complete checkpoint"),
        ("ckpt: resume a file", train("c7", f"trainer.resume={corpus}.bin"), "c.bin"),
        ("ckpt: init_from missing", train("c8", f"trainer.init_from={ws / 'gone'}"), "gone"),
        ("ckpt: init_from an HF folder", train("c9", f"trainer.init_from={ws / 'hf'}"), "hf"),
        ("ckpt: init_from missing shard", train("c10", f"trainer.init_from={ckpts / 'no_shard'}"), "no_shard"),
        ("generate: corrupt .metadata", tool("generate", ckpts / "bad_metadata"), "bad_metadata"),
        ("generate: missing shard", tool("generate", ckpts / "no_shard"), "no_shard"),
        ("export: truncated shard", tool("export_hf", ckpts / "trunc_shard", ws / "e1"), "trunc_shard"),
        # tools' arguments and outputs
        ("export: missing checkpoint", tool("export_hf", ws / "gone", ws / "e2"), "gone"),
        ("export: existing output", tool("export_hf", run, ws / "taken"), "already exists"),
        ("export: output under a file", tool("export_hf", run, ws / "a_file" / "x"), "a_file"),
        ("import: missing folder", tool("import_hf", ws / "gone", ws / "i1"), "gone"),
        ("import: existing output", tool("import_hf", ws / "hf", ws / "taken"), "already exists"),
        ("upcycle: missing checkpoint", tool("upcycle", ws / "gone", ws / "u1", "--num-experts", 4, "--top-k", 2),
         "gone"),
        ("upcycle: --num-experts 0", tool("upcycle", dense, ws / "u2", "--num-experts", 0, "--top-k", 1),
         "--num-experts"),
        ("upcycle: --top-k > experts", tool("upcycle", dense, ws / "u3", "--num-experts", 4, "--top-k", 5),
         "model.moe.top_k=5"),
        ("upcycle: --router-std nan", tool("upcycle", dense, ws / "u4", "--num-experts", 4, "--top-k", 2,
                                           "--router-std", "nan"), "--router-std"),
        ("upcycle: --aux-loss-coef -1", tool("upcycle", dense, ws / "u5", "--num-experts", 4, "--top-k", 2,
                                             "--aux-loss-coef", -1), "aux_loss_coef=-1.0"),
        ("upcycle: an MoE checkpoint", tool("upcycle", run, ws / "u6", "--num-experts", 4, "--top-k", 2),
         "is already an MoE model (8 experts)"),
        ("upcycle: existing output", tool("upcycle", dense, ws / "taken", "--num-experts", 4, "--top-k", 2),
         "already exists"),
        ("depth: --drop -1", tool("depth_upscale", run, ws / "du1", "--drop", -1), "--drop"),
        ("depth: --drop all layers", tool("depth_upscale", run, ws / "du2", "--drop", 2), "--drop"),
        ("depth: missing checkpoint", tool("depth_upscale", ws / "gone", ws / "du3"), "gone"),
        ("depth: existing output", tool("depth_upscale", run, ws / "taken"), "already exists"),
        ("generate: --max-new-tokens -1", tool("generate", run, "--max-new-tokens", -1), "--max-new-tokens"),
        ("generate: --temperature nan", tool("generate", run, "--temperature", "nan"), "--temperature"),
        ("generate: --temperature inf", tool("generate", run, "--temperature", "inf"), "--temperature"),
        ("generate: --top-k -1", tool("generate", run, "--top-k", -1), "--top-k"),
        ("plot: missing run dir", tool("plot", ws / "gone"), "gone"),
        ("plot: no metrics.jsonl", tool("plot", ws / "plots" / "empty"), "metrics.jsonl"),
        ("plot: random bytes as metrics", tool("plot", ws / "plots" / "garbage"), "metrics.jsonl"),
        ("inspect: model.dim=-1", tool("inspect", "model.dim=-1"), "model.dim"),
        ("plan: --gpus 0", tool("plan", "--gpus", 0), "--gpus=0"),
        ("plan: --gpu-memory-gb nan", tool("plan", "--gpus", 8, "--gpu-memory-gb", "nan"), "--gpu-memory-gb=nan"),
        ("plan: --gpu-memory-gb inf", tool("plan", "--gpus", 8, "--gpu-memory-gb", "inf"), "--gpu-memory-gb=inf"),
        ("plan: --max-gpus -1", tool("plan", "--gpus", 8, "--max-gpus", -1), "--max-gpus=-1"),
        ("plan: --json is a folder", tool("plan", "--gpus", 8, "--json", ws / "taken"), "taken"),
        # Hugging Face folders
        ("hf: config.json invalid JSON", tool("import_hf", hfs / "bad_json", ws / "h1"), "config.json"),
        ("hf: truncated safetensors", tool("import_hf", hfs / "trunc_st", ws / "h2"), "model.safetensors"),
        ("hf: random bytes as safetensors", tool("import_hf", hfs / "rand_st", ws / "h3"), "model.safetensors"),
        ("hf: missing shard of an index", tool("import_hf", hfs / "no_shard", ws / "h4"), "model-00002-of-00002"),
        ("hf: no config.json", tool("import_hf", hfs / "no_config", ws / "h5"), "config.json"),
        ("hf: no model_type", tool("import_hf", hfs / "no_model_type", ws / "h6"), "model_type"),
        ("hf: pytorch_model.bin only", tool("import_hf", hfs / "bin_only", ws / "h7"), "safetensors"),
        # config values through the command line
        ("config: optim.lr=nan", train("k1", "optim.lr=nan"), "optim.lr=nan"),
        ("config: trainer.max_steps=-1", train("k2", "trainer.max_steps=-1"), "trainer.max_steps=-1"),
        ("config: model.dim=0", train("k3", "model.dim=0"), "model.dim=0"),
        ("config: data.seq_len=inf", train("k4", "data.seq_len=inf"), "data.seq_len"),
        ("config: optim.weight_decay=-1", train("k5", "optim.weight_decay=-1"), "optim.weight_decay"),
        ("config: model.moe.aux_loss_coef=inf", train("k6", "model.moe.aux_loss_coef=inf"), "aux_loss_coef"),
        ("config: trainer.micro_batch_size=0", train("k7", "trainer.micro_batch_size=0"), "micro_batch_size"),
        ("config: model.num_heads=3", train("k8", "model.num_heads=3"), "model.num_heads=3"),
        ("config: out_dir over a checkpoint's shard", train("k9", f"trainer.out_dir={ckpt_shard(run)}"),
         "distcp"),
        ("config: trainer.compile with no C++ compiler",
         ["env", "CXX=/nonexistent/c++", *train("k10", "trainer.compile=true")], "CXX"),
    ]  # fmt: skip
    return table


# Run by the slow half of the test: near repeats of a core case, so the default run stays short.
MORE = {
    "data: JSON as .idx", "data: prefix is a folder", "data: tokenizer missing",
    "prepare: --vocab-size -5", "prepare: --workers 0", "prepare: output under a file",
    "ckpt: empty .metadata", "ckpt: resume a file", "ckpt: init_from missing", "ckpt: init_from missing shard",
    "generate: missing shard", "upcycle: missing checkpoint", "upcycle: --top-k > experts",
    "upcycle: --aux-loss-coef -1", "upcycle: existing output", "depth: missing checkpoint",
    "depth: existing output", "generate: --temperature inf", "generate: --top-k -1", "plot: missing run dir",
    "inspect: model.dim=-1", "plan: --gpus 0", "plan: --gpu-memory-gb inf", "plan: --max-gpus -1",
    "import: missing folder", "export: output under a file", "hf: random bytes as safetensors",
    "config: optim.weight_decay=-1", "config: trainer.micro_batch_size=0",
    "config: out_dir over a checkpoint's shard",
    "prepare: --vocab-size 0",
    "prepare: --bpe-sample-mb nan",
    "data: document mask, a tokenizer without the token",
    "ckpt: no config.yaml",
    "generate: corrupt .metadata",
    "export: truncated shard",
    "export: missing checkpoint",
    "import: existing output",
    "upcycle: --router-std nan",
    "depth: --drop all layers",
    "plot: no metrics.jsonl",
    "plan: --json is a folder",
    "hf: no config.json",
    "hf: no model_type",
    "hf: pytorch_model.bin only",
    "config: model.dim=0",
    "config: data.seq_len=inf",
    "config: model.moe.aux_loss_coef=inf",
    "config: model.num_heads=3",
    "ckpt: init_from an HF folder",
    "ckpt: resume a folder",
}  # fmt: skip


def ckpt_shard(run: Path) -> Path:
    return next((run / "checkpoints" / "step_00000002").glob("*.distcp"))


@pytest.mark.parametrize("half", ["core", pytest.param("more", marks=pytest.mark.slow)])
def test_bad_inputs_one_line_non_zero_exit_nothing_lost(ws, half):
    every = cases(ws)
    assert MORE <= {name for name, _, _ in every}
    table = [case for case in every if (case[0] in MORE) == (half == "more")]
    before = snapshot(ws)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    failures = []
    for start in range(0, len(table), BATCH):
        batch = table[start : start + BATCH]
        started = [
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            for _, cmd, _ in batch
        ]
        for process, (name, _, culprit) in zip(started, batch):
            try:
                _, stderr = process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                failures.append(f"{name}: hangs")
                continue
            if process.returncode != 2 or "Traceback" in stderr or culprit not in stderr:
                failures.append(f"{name}: exit {process.returncode}: {stderr.strip()[-600:]}")
    after = snapshot(ws)
    changed = [str(p) for p, digest in before.items() if after.get(p) != digest]
    assert not failures, "\n\n".join(failures)
    assert not changed
    assert len(every) >= 60
