"""Hydra at the edge: compose conf/ with CLI overrides into the typed Config, with one-line errors.

Used by train.py and the tools that take Hydra-style overrides (`model=mixtral_8x7b`). Nothing else
under moe_train/ imports hydra.
"""

from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from moe_train.config import Config, ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def register_schema() -> None:
    """conf/config.yaml lists `schema` first: every key exists, with its type, before any override."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)


def _one_line(error: BaseException) -> str:
    """`full_key: first line` for OmegaConf errors (also when Hydra wraps them), else the message."""
    cause = error if isinstance(error, OmegaConfBaseException) else error.__cause__
    key = getattr(cause, "full_key", None)
    if key and str(cause).strip():
        return f"{key}: {str(cause).strip().splitlines()[0]}"
    return " ".join(str(error).split()) or type(error).__name__


def to_config(cfg: DictConfig) -> Config:
    """Check the composed config against the schema and build the dataclasses (running every check)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        if isinstance(e.__cause__, ConfigError):  # raised by a dataclass check inside to_object
            raise e.__cause__ from None
        raise ConfigError(_one_line(e)) from None


def apply_init_from(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """With trainer.init_from the architecture comes with the weights: cfg.model becomes the
    checkpoint's, with the command line's model.* overrides applied over it (a training-time value
    such as model.moe.aux_loss_coef or model.moe.capacity_factor takes effect; a changed shape then
    fails to load the weights, in one line), and init_from the checkpoint folder itself (a run
    directory's newest). A model= preset is not applied: the checkpoint's architecture replaces it."""
    if not cfg.trainer.init_from:
        return cfg
    from moe_train.train.checkpoint import load_config, resolve_checkpoint

    keys = [o.lstrip("+").partition("=")[0] for o in overrides if not o.startswith("~")]
    path = resolve_checkpoint(cfg.trainer.init_from)
    model = OmegaConf.structured(load_config(path).model)
    for key in keys:
        if key.startswith("model."):
            OmegaConf.update(model, key.removeprefix("model."), OmegaConf.select(cfg, key), merge=False)
    cfg = copy.deepcopy(cfg)
    cfg.model = model
    cfg.trainer.init_from = str(path)
    return cfg


def check_presets(overrides: list[str]) -> None:
    """`group=name` must name a file conf/group/name.yaml; say which names exist if not."""
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        group_dir = CONF_DIR / key
        if not sep or "." in key or not group_dir.is_dir():
            continue
        if not (group_dir / f"{value}.yaml").is_file():
            available = sorted(p.stem for p in group_dir.glob("*.yaml"))
            raise ConfigError(f"{key}={value} is not a preset; available: {', '.join(available)}")


def compose_config(overrides: list[str]) -> Config:
    """conf/config.yaml + overrides -> Config, raising ConfigError with one line on any mistake."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    register_schema()
    check_presets(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_one_line(e)) from None
    return to_config(apply_init_from(cfg, overrides))
