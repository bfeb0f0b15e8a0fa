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
from torch.distributed import DistBackendError

from moe_train.config import ConfigError, first_line
from moe_train.parallel.topology import CollectiveFailed, launcher_env
from moe_train.tools.cli import exit_on_config_error, retain_freed_memory
from moe_train.tools.hydra_config import apply_init_from, compose_config, register_schema, to_config
from moe_train.train.checkpoint import CheckpointNotSaved
from moe_train.train.preflight import preflight as preflight_checks
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
    except CollectiveFailed as e:  # a peer died or hung: each survivor names what it waited in
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(1)
    except DistBackendError as e:  # the same, in a collective of torch's own (FSDP's)
        print(f"error: a collective failed on rank {launcher_env()[1]}: {first_line(e)}", file=sys.stderr)
        sys.exit(1)


def preflight(argv: list[str]) -> None:
    """Hydra reports composition mistakes (an unknown preset or key) over several lines with exit
    code 1; compose once here first so they get our one line and exit code 2, as do the layout,
    the folders the run writes (Hydra creates trainer.out_dir before main), a run already in them
    and a checkpoint of the other engine (moe_train/train/preflight.py). Sweeps (-m) and Hydra's
    own flags go straight to Hydra."""
    if any(a in ("-m", "--multirun") or a.startswith("-") for a in argv):
        return
    world_size, rank, _ = launcher_env()
    try:
        config = compose_config([a for a in argv if not a.startswith(("hydra.", "hydra/"))])
        preflight_checks(config, world_size, main_rank=rank == 0)
    except ConfigError as e:  # the same on every rank: rank 0 says it
        if rank == 0:
            exit_on_config_error(e)
        sys.exit(2)


if __name__ == "__main__":
    # rank 0 (torchrun's or srun's) tells the story; the other ranks speak up only for warnings
    logging.getLogger("moe_train").setLevel(logging.INFO if launcher_env()[1] == 0 else logging.WARNING)
    register_schema()
    preflight(sys.argv[1:])
    main()
