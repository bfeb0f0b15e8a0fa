"""Train a Mixture-of-Experts language model.

    python train.py                                   # the default: mixtral_tiny on the stdlib corpus
    python train.py model=dbrx_tiny trainer.max_steps=100
    torchrun --nproc_per_node=4 train.py parallel.ep=4

Composes conf/ with the command line (Hydra), turns it into the typed Config once, trains.
A configuration mistake (a trainer.out_dir or data.cache_dir that is a file, too) prints one line
naming the key and exits with code 2; a run whose loss or gradient norm stops being finite, or whose
checkpoint cannot be written (a full disk), prints one line and exits with code 1.
"""

import logging
import sys

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from moe_train.config import ConfigError
from moe_train.parallel.topology import launcher_env
from moe_train.tools.cli import exit_on_config_error, retain_freed_memory
from moe_train.tools.hydra_config import apply_init_from, compose_config, register_schema, to_config
from moe_train.train.checkpoint import CheckpointNotSaved, check_run_folders
from moe_train.train.trainer import Diverged, run


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        config = to_config(apply_init_from(cfg, list(HydraConfig.get().overrides.task)))
        if config.trainer.device == "cpu" or not torch.cuda.is_available():
            retain_freed_memory()
        run(config)
    except ConfigError as e:
        exit_on_config_error(e)
    except (Diverged, CheckpointNotSaved) as e:  # every rank stops at the same step: one says why
        if launcher_env()[1] == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def preflight(argv: list[str]) -> None:
    """Hydra reports composition mistakes (an unknown preset or key) over several lines with exit
    code 1; compose once here first so they get our one line and exit code 2, as do the folders
    the run writes (Hydra creates trainer.out_dir before main). Sweeps (-m) and Hydra's own flags
    go straight to Hydra."""
    if any(a in ("-m", "--multirun") or a.startswith("-") for a in argv):
        return
    try:
        check_run_folders(compose_config([a for a in argv if not a.startswith(("hydra.", "hydra/"))]))
    except ConfigError as e:
        exit_on_config_error(e)


if __name__ == "__main__":
    # rank 0 (torchrun's or srun's) tells the story; the other ranks speak up only for warnings
    logging.getLogger("moe_train").setLevel(logging.INFO if launcher_env()[1] == 0 else logging.WARNING)
    register_schema()
    preflight(sys.argv[1:])
    main()
