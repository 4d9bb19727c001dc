"""The training config: a typed schema, loading a yaml with Hydra overrides, and validation.

Built on Hydra's compose API (defaults lists and the override grammar ``key=value``, ``+new_key=value``,
``~key``) and OmegaConf structured configs: merging a yaml into :class:`TrainConfig` rejects unknown or
misspelled top-level keys and wrong types, naming the key, before anything is built. Keys inside registry
sections (``model``, ``algorithms``, ...) are checked against their builders' signatures by
:mod:`diffusion.registry`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from diffusion.utils import TIME_STRINGS, ConfigError, is_time_string

__all__ = ['ConfigError', 'TrainConfig', 'check_s3_credentials', 'load_config', 'validate_config']


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
            loaded: set it only for a file you trust (it must still carry a manifest signed with the checkpoint key,
            see :mod:`diffusion.checkpointing`).
        load_strict_model_weights: Refuse a checkpoint whose model state lacks some of the model's weights or holds
            others, naming them (Composer's own flag of that name applies only with ``load_weights_only``, and an
            empty model state loaded nothing, silently). ``false`` loads the weights that match and warns.
        tf32: Run float32 matmuls and cuDNN convolutions in TF32 on the GPU (``torch.backends.cuda.matmul.allow_tf32``,
            ``torch.backends.cudnn.allow_tf32``); no effect, logged, on a CPU run. See :mod:`diffusion.optim`.
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
    tf32: bool = False
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
    overrides = list(overrides or [])
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        while True:
            try:
                cfg = compose(config_name=os.path.splitext(config_file)[0], overrides=overrides)
                break
            except HydraException as error:
                if not _add_missing_key(error, overrides):
                    message = ' '.join(str(error).split())
                    if error.__cause__ is not None:  # e.g. "Value 'abc' of type 'str' could not be converted to ..."
                        message += f': {str(error.__cause__).splitlines()[0]}'
                    raise ConfigError(f'{path}: {message}') from None
    with open_dict(cfg):
        if cfg.get('run_name') is None:
            # A stable default name, so that autoresume finds the run again.
            cfg.run_name = os.path.splitext(config_file)[0]
    return validate_config(cfg)


# How deep below each section the registries' checks (diffusion.builders.check_sections) know every key: a
# `model.<key>`, `algorithms.<name>.<key>`, `model.adapters.<name>.<key>`.
_CHECKED_DEPTH = {
    'model': 2,
    'train_dataloader': 2,
    'eval_dataloader': 2,
    'optimizer': 2,
    'scheduler': 2,
    'algorithms': 3,
    'callbacks': 3,
    'loggers': 3,
    'parallelism_config': 3,
}


def _add_missing_key(error: HydraException, overrides: List[str]) -> bool:
    """Turn ``section.key=value`` for a key the yaml lacks into ``+section.key=value``; say whether it did.

    Hydra refuses such an override and advises adding ``+``, which for a misspelled key
    (``model.caption_drop_prb=0.2``) leads to the wrong fix. A key of a registry section is added instead, and
    :func:`diffusion.builders.check_sections` then refuses a misspelled one, naming it and the valid keys, before
    anything is built. A misspelled top-level key is refused here with the schema's keys.
    """
    match = re.match(r"Could not override '([^']+)'", str(error))
    if match is None or not isinstance(error.__cause__, (ConfigAttributeError, ConfigKeyError)):
        return False
    key = match.group(1)
    parts = key.split('.')
    index = next((i for i, o in enumerate(overrides) if o.split('=', 1)[0].strip() == key), None)
    if len(parts) == 1:
        if key not in TrainConfig.__dataclass_fields__:
            valid = ', '.join(TrainConfig.__dataclass_fields__)
            raise ConfigError(f'Unknown config key {key!r}. Valid top-level keys: {valid}.')
        if index is None:
            return False
        # A whole section (eval_dataloader={name: ..., ...}) that the yaml leaves empty: merged in, then checked.
        overrides[index] = '++' + overrides[index]
        return True
    if parts[:2] == ['model', 'adapters']:
        checked = 3 <= len(parts) <= 4
    else:
        checked = 2 <= len(parts) <= _CHECKED_DEPTH.get(parts[0], 0)
    if not checked or index is None:
        return False  # deeper keys (model.unet_config.<field>) go to libraries unchecked: Hydra's advice stands
    overrides[index] = '+' + overrides[index]
    return True


# Top-level keys that Composer reads as a time: a typo fails here, not when the Trainer is built after the model.
_TIME_KEYS = ('max_duration', 'save_interval', 'eval_interval', 'console_log_interval')


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
        raise ConfigError(f'Unknown config key {error.full_key!r}. Valid top-level keys: {valid}.') from None
    except OmegaConfBaseException as error:
        raise ConfigError(f'Invalid config key {error.full_key!r}: {error.msg.splitlines()[0]}') from None
    for section in ('model', 'train_dataloader', 'optimizer', 'eval_dataloader', 'scheduler'):
        # The optional sections are empty when unused; once given, they too need a name.
        if (merged[section] or section in ('model', 'train_dataloader', 'optimizer')) and 'name' not in merged[section]:
            raise ConfigError(f'Config section {section!r} needs a "name" key naming a registered builder.')
    for key in _TIME_KEYS:
        value = merged[key]
        if isinstance(value, str) and not is_time_string(value):
            raise ConfigError(f'Invalid {key}={value!r}: expected {TIME_STRINGS}.')
    if merged.autoresume and merged.save_folder and not merged.save_overwrite:
        # A run killed after writing a checkpoint but before linking it as the latest leaves a newer file, which
        # Composer refuses to overwrite: the restart would fail until someone deletes it by hand.
        raise ConfigError('autoresume needs save_overwrite: true, so a restart can replace a checkpoint left unlinked.')
    return merged


def _s3_locations(node: Any, where: str = '') -> List[tuple]:
    """``(config path, value)`` of every ``s3://`` string in a config, in order."""
    if isinstance(node, dict):
        return [
            found for key, value in node.items() for found in _s3_locations(value, f'{where}.{key}' if where else key)
        ]
    if isinstance(node, (list, tuple)):
        return [found for i, value in enumerate(node) for found in _s3_locations(value, f'{where}[{i}]')]
    return [(where, node)] if isinstance(node, str) and node.startswith('s3://') else []


def check_s3_credentials(cfg: Any) -> None:
    """Raise a :class:`ConfigError` naming the first ``s3://`` location of ``cfg`` when no AWS credentials are found.

    Without credentials, streaming and Composer's object store retry and fail with ``NoCredentialsError``
    tracebacks that name neither the bucket nor the config key. Looks the credentials up as they do (boto3's chain:
    environment, ``AWS_PROFILE`` and the shared files, instance metadata) without any request to the bucket.
    """
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    locations = _s3_locations(container)
    if not locations:
        return
    import boto3  # only configs that name a bucket pay for it
    from botocore.exceptions import BotoCoreError

    where, location = locations[0]
    how = (
        'set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE naming a profile of ~/.aws/credentials; '
        'for an S3-compatible store other than AWS, set S3_ENDPOINT_URL too'
    )
    try:
        credentials = boto3.session.Session().get_credentials()
    except BotoCoreError as error:  # e.g. AWS_PROFILE names no profile
        raise ConfigError(f'{where}={location}: cannot read AWS credentials ({error}); {how}.') from None
    if credentials is None:
        raise ConfigError(f'{where}={location}: no AWS credentials found to reach it; {how}.')
