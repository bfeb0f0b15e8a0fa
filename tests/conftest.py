import pytest

# A model small enough that a few steps take a second on 2 CPU cores.
TINY = [
    "model=mixtral_tiny",
    "data=stdlib_bytes",
    "model.dim=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.ffn_hidden_dim=96",
    "data.seq_len=32",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.eval_batches=2",
    "trainer.sample_tokens=16",
    "trainer.num_samples=1",
    "logging.wandb.mode=disabled",
    "logging.progress_bar=false",
]


@pytest.fixture
def tiny_overrides(tmp_path):
    return [*TINY, f"trainer.out_dir={tmp_path / 'run'}"]


def train(overrides: list[str]) -> list[dict]:
    """One in-process run of train.py's `run` on composed overrides; its metrics.jsonl."""
    from moe_train.tools.hydra_config import compose_config
    from moe_train.train.metrics import read_metrics
    from moe_train.train.trainer import run

    config = compose_config(overrides)
    run(config)
    return read_metrics(config.trainer.out_dir)


def losses(metrics: list[dict]) -> list[tuple]:
    return [(m["step"], m["loss"], m["grad_norm"]) for m in metrics]
