"""The inspect, plot and generate CLIs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_train.config import ConfigError
from moe_train.data import ByteTokenizer
from moe_train.model import Transformer
from moe_train.tools import plot
from moe_train.tools.generate import sample
from moe_train.tools.hydra_config import compose_config
from moe_train.train.checkpoint import load_config, load_weights, resolve_checkpoint
from moe_train.train.trainer import run
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]


def test_inspect_prints_counts_as_json():
    result = subprocess.run(
        [sys.executable, "-m", "moe_train.tools.inspect", "model=mixtral_8x7b"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    counts = json.loads(result.stdout)
    assert counts["total_params"] == 46_702_792_704
    assert counts["active_params"] == 12_879_925_248
    assert counts["flops_per_token"] > 6 * 12e9


def test_inspect_unknown_preset_one_line_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "moe_train.tools.inspect", "model=mixtral_9x7b"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: model=mixtral_9x7b is not a preset; available:")


def test_plot_writes_loss_and_expert_load(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {
            "step": s,
            "lm_loss": 5 - s / 10,
            "expert_load/layer_0": [0.5, 0.25, 0.25, 0.0],
            **({"val_loss": 5 - s / 9} if s % 5 == 0 else {}),
        }
        for s in range(1, 21)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    plot.main([str(run)])
    for name in ("loss.png", "expert_load_layer_0.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A byte-level tiny MoE trained 2 steps with a capacity factor of 1 (it drops tokens)."""
    out_dir = tmp_path_factory.mktemp("generate") / "run"
    steps = ["trainer.max_steps=2", "trainer.num_samples=0", "model.moe.capacity_factor=1.0"]
    run(compose_config([*TINY, f"trainer.out_dir={out_dir}", *steps]))
    return out_dir


def test_generate_greedy_matches_a_plain_argmax_loop_routing_dropless(trained):
    """Temperature 0 against argmax over the full forward at every step, on the same weights built
    without a capacity factor (sampling routes dropless; with 1.0 these short inputs drop tokens)."""
    path = resolve_checkpoint(trained)
    config = load_config(path)
    config.model.moe.capacity_factor = None
    model = Transformer(config.model).eval()
    load_weights(path, model)
    tokenizer = ByteTokenizer()
    tokens = [tokenizer.eos_id, *tokenizer.encode("def ")]
    with torch.no_grad():
        for _ in range(12):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    expected = tokenizer.decode(tokens[1:])
    assert sample(str(trained), ["def "], 12, temperature=0.0, top_k=0, seed=0) == [expected]


def test_generate_is_reproducible_for_a_seed_and_keeps_each_prompt(trained):
    prompts = ["def ", "import "]
    first = sample(str(trained), prompts, 16, temperature=1.0, top_k=50, seed=3)
    assert first == sample(str(trained), prompts, 16, temperature=1.0, top_k=50, seed=3)
    assert [s[: len(p)] for s, p in zip(first, prompts)] == prompts
    assert first != sample(str(trained), prompts, 16, temperature=1.0, top_k=50, seed=4)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": -1.0}, "--temperature=-1.0 must be >= 0"),
        ({"max_new_tokens": 0}, "--max-new-tokens=0 must be >= 1"),
        ({"top_k": -2}, "--top-k=-2 must be >= 0"),
    ],
)
def test_generate_refuses_bad_values(trained, kwargs, message):
    args = {"max_new_tokens": 4, "temperature": 1.0, "top_k": 0, "seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=message):
        sample(str(trained), ["def "], **args)


def test_generate_cli_one_line_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "moe_train.tools.generate", str(tmp_path / "missing")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: {tmp_path / 'missing'} is not a moe_train checkpoint (a folder with config.yaml and DCP's .metadata)"
    )
