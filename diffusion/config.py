"""The training config: a typed schema, loading a yaml with Hydra overrides, and validation.

Built on Hydra's compose API (defaults lists and the override grammar ``key=value``, ``+new_key=value``,
``~key``) and OmegaConf structured configs: merging a yaml into :class:`TrainConfig` rejects unknown or
misspelled top-level keys and wrong types, naming the key, before anything is built. Keys inside registry
sections (``model``, ``algorithms``, ...) are checked against their builders' signatures by
:mod:`diffusion.registry`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

__all__ = ['TrainConfig', 'load_config', 'validate_config']


@dataclass
class TrainConfig:
    """What a training run is. Registry sections hold ``name`` plus the builder's keyword arguments.

    Attributes:
        model: ``{name: <models registry name>, **kwargs}``.
        train_dataloader: ``{name: <dataloaders registry name>, batch_size: <global>, **kwargs}``.
        max_duration: Training length as a Composer time string (``'1000ba'``, ``'2ep'``, ``'1000000sp'``).
        eval_dataloader: Like ``train_dataloader``; validation is skipped when empty.
        optimizer: ``{name: <optimizers registry name>, **kwargs}``; gets the trainable parameters.
        scheduler: ``{name: <schedulers registry name>, **kwargs}``, or empty for a constant LR.
        parallelism_config: Composer's parallelism config, e.g. ``{fsdp: {sharding_strategy: FULL_SHARD}}``.
        algorithms, callbacks, loggers: ``{<registry name>: {**kwargs}}``.
        load_trusted: Allow a ``load_path`` outside ``save_folder``. Checkpoints are pickles, which run code when
            loaded: set it only for a file you trust (it must still match its SHA-256 manifest, see
            :mod:`diffusion.checkpointing`).
        load_strict_model_weights: Refuse a checkpoint whose model state lacks some of the model's weights or holds
            others, naming them (Composer's own flag of that name applies only with ``load_weights_only``, and an
            empty model state loaded nothing, silently). ``false`` loads the weights that match and warns.
    """

    model: Dict[str, Any] = MISSING
    train_dataloader: Dict[str, Any] = MISSING
    max_duration: str = MISSING
    run_name: Optional[str] = None
    run_folder: Optional[str] = None
    seed: int = 17
    # Empty dicts rather than None for optional sections, so that `section={...}` overrides merge into them.
    eval_dataloader: Dict[str, Any] = field(default_factory=dict)
    optimizer: Dict[str, Any] = field(default_factory=lambda: {'name': 'adamw', 'lr': 1.0e-4})
    scheduler: Dict[str, Any] = field(default_factory=dict)
    algorithms: Dict[str, Optional[Dict[str, Any]]] = field(default_factory=dict)
    callbacks: Dict[str, Optional[Dict[str, Any]]] = field(default_factory=dict)
    loggers: Dict[str, Optional[Dict[str, Any]]] = field(default_factory=dict)
    device: Optional[str] = None
    precision: Optional[str] = None
    device_train_microbatch_size: Optional[Any] = None
    eval_interval: Any = 1
    eval_subset_num_batches: int = -1
    save_folder: Optional[str] = None
    save_interval: str = '1ep'
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    load_path: Optional[str] = None
    load_trusted: bool = False
    load_weights_only: bool = False
    load_strict_model_weights: bool = True
    autoresume: bool = False
    progress_bar: bool = True
    log_to_console: bool = False
    console_log_interval: str = '1ba'
    deterministic_mode: bool = False
    dist_timeout: float = 300.0
    parallelism_config: Dict[str, Any] = field(default_factory=dict)
    python_log_level: Optional[str] = 'info'
    tags: List[str] = field(default_factory=list)


ConfigStore.instance().store(name='train_config_schema', node=TrainConfig)


def load_config(path: str, overrides: Optional[List[str]] = None) -> DictConfig:
    """Compose the yaml at ``path`` with Hydra ``overrides`` and validate it against :class:`TrainConfig`.

    A yaml whose defaults list starts with ``train_config_schema`` is composed onto the schema, so that any
    schema key can be overridden (``precision=amp_bf16``) and unknown keys fail during composition.
    """
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Config file not found: {path}')
    config_dir, config_file = os.path.split(path)
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        try:
            cfg = compose(config_name=os.path.splitext(config_file)[0], overrides=list(overrides or []))
        except HydraException as error:
            message = ' '.join(str(error).split())
            if error.__cause__ is not None:  # e.g. "Value 'abc' of type 'str' could not be converted to Integer"
                message += f': {str(error.__cause__).splitlines()[0]}'
            raise ValueError(f'{path}: {message}') from None
    with open_dict(cfg):
        if cfg.get('run_name') is None:
            # A stable default name, so that autoresume finds the run again.
            cfg.run_name = os.path.splitext(config_file)[0]
    return validate_config(cfg)


def validate_config(cfg: Any) -> DictConfig:
    """Merge ``cfg`` into the schema; raise ``ValueError`` naming an unknown key, a wrong type or a missing field."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    schema = OmegaConf.structured(TrainConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ValueError(f'Missing required config key(s): {", ".join(missing)}.')
        OmegaConf.resolve(merged)
    except ConfigKeyError as error:
        valid = ', '.join(TrainConfig.__dataclass_fields__)
        raise ValueError(f'Unknown config key {error.full_key!r}. Valid top-level keys: {valid}.') from None
    except OmegaConfBaseException as error:
        raise ValueError(f'Invalid config key {error.full_key!r}: {error.msg.splitlines()[0]}') from None
    for section in ('model', 'train_dataloader', 'optimizer'):
        if 'name' not in merged[section]:
            raise ValueError(f'Config section {section!r} needs a "name" key naming a registered builder.')
    if merged.autoresume and merged.save_folder and not merged.save_overwrite:
        # A run killed after writing a checkpoint but before linking it as the latest leaves a newer file, which
        # Composer refuses to overwrite: the restart would fail until someone deletes it by hand.
        raise ValueError('autoresume needs save_overwrite: true, so a restart can replace a checkpoint left unlinked.')
    return merged
