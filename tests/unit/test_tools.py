"""The inspect and plot CLIs."""

import json
import subprocess
import sys
from pathlib import Path

from moe_train.tools import plot

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
