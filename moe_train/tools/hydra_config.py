"""Hydra at the edge: compose conf/ with CLI overrides into the typed Config, with one-line errors.

Used by train.py and the tools that take Hydra-style overrides (`model=mixtral_8x7b`). Nothing else
under moe_train/ imports hydra.
"""

from __future__ import annotations

import copy
import os
from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from moe_train.config import Config, ConfigError, first_line

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def register_schema() -> None:
    """conf/config.yaml lists `schema` first: every key exists, with its type, before any override.
    Also the `expanduser` resolver, with which hydra.run.dir follows trainer.out_dir's ~."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)
    OmegaConf.register_new_resolver("expanduser", os.path.expanduser, replace=True)


def _unknown_key(cfg: DictConfig, node, prefix: str = "") -> str | None:
    """The first key of `cfg` that the dataclass `node` has no field for (one added with `+key=`,
    which the schema's struct mode lets through), searching nested dataclasses."""
    names = {f.name: getattr(node, f.name) for f in fields(node)}
    for key in cfg:
        if key not in names:
            return f"{prefix}{key}"
        if is_dataclass(names[key]) and isinstance(cfg[key], DictConfig):
            found = _unknown_key(cfg[key], names[key], f"{prefix}{key}.")
            if found:
                return found
    return None


def _one_line(error: BaseException) -> str:
    """`full_key: first line` for OmegaConf errors (also when Hydra wraps them), else the message."""
    cause = error if isinstance(error, OmegaConfBaseException) else error.__cause__
    key = getattr(cause, "full_key", None)
    if key and str(cause).strip():
        return f"{key}: {first_line(cause)}"
    return " ".join(str(error).split()) or type(error).__name__


def to_config(cfg: DictConfig) -> Config:
    """Check the composed config against the schema and build the dataclasses (running every check)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
        unknown = _unknown_key(cfg, config)
        if unknown:
            raise ConfigError(f"{unknown}: no such key in the schema (moe_train/config/)")
        return config
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
    try:
        path = resolve_checkpoint(cfg.trainer.init_from)
        model = OmegaConf.structured(load_config(path).model)
    except ConfigError:
        # The source may be gone once the run has checkpoints of its own, which it resumes from
        # instead (a requeued job): their architecture is the one to build.
        own = _own_newest_checkpoint(cfg)
        if own is None:
            raise
        path, model = Path(cfg.trainer.init_from), OmegaConf.structured(load_config(own).model)
    for key in keys:
        if key.startswith("model."):
            OmegaConf.update(model, key.removeprefix("model."), OmegaConf.select(cfg, key), merge=False)
    cfg = copy.deepcopy(cfg)
    cfg.model = model
    cfg.trainer.init_from = str(path)
    return cfg


def _own_newest_checkpoint(cfg: DictConfig) -> Path | None:
    """The newest complete checkpoint in trainer.out_dir when the run resumes from it (resume=auto)
    and out_dir is a plain path (not one that depends on the model's name, which init_from sets)."""
    from moe_train.train.checkpoint import resolve_checkpoint

    trainer = cfg.trainer
    if trainer.resume != "auto" or OmegaConf.is_interpolation(trainer, "out_dir"):
        return None
    out_dir = Path(os.path.expanduser(trainer.out_dir))
    if not (out_dir / "checkpoints").is_dir():
        return None
    try:
        return resolve_checkpoint(out_dir)
    except ConfigError:  # no complete checkpoint
        return None


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
