"""Load a trained model for inference: from a Composer checkpoint (local or object store) or a diffusers folder.

A Composer checkpoint is a pickle, so it is fetched with Composer's ``get_file`` (local paths and ``s3://``-style
URIs alike), checked against its signed SHA-256 manifest by :func:`diffusion.checkpointing.validate_checkpoint` (a
manifest anyone could have written, unsigned or signed with another key, is refused) and only then unpickled
(memory-mapped, so the optimizer state it also holds is never read). The model is rebuilt from the run's config,
which :class:`~diffusion.checkpointing.RunConfigInCheckpoint` embeds in every checkpoint (older ones
fall back to the ``config.yaml`` that :func:`diffusion.builders.build_trainer` writes in the run folder), with the
components the run loaded from a pretrained folder rebuilt from the checkpoint
(:mod:`diffusion.callbacks.pretrained_components`), so that folder is not needed, and gets the checkpoint's weights:
the EMA average when Composer's ``EMA`` (``ema``, :class:`~diffusion.algorithms.ShardedEMA`) ran, else the training
weights. Composer swaps the EMA weights into the model before each save and keeps the
training weights in the algorithm's state (``ema_weights_active`` says which is where), so both are found whichever
way round they were saved.

A diffusers pipeline folder (``model_index.json``; what :mod:`diffusion.inference.export` writes) is loaded with
the pipeline's ``from_pretrained`` (safetensors only) and wrapped in the project's model class.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import torch
from composer.utils import get_file, parse_uri, reproducibility
from omegaconf import DictConfig, OmegaConf

from diffusion.builders import build_model
from diffusion.callbacks.frozen_base import base_record, check_base, complete_weights
from diffusion.callbacks.pretrained_components import pretrained_folder_from_checkpoint
from diffusion.checkpointing import (
    CONFIG_FILENAME,
    LATEST_CHECKPOINT,
    MANIFEST_SUFFIX,
    SIGN_COMMAND,
    RunConfigInCheckpoint,
    UntrustedCheckpointError,
    describe_key_mismatch,
    validate_checkpoint,
)
from diffusion.config import load_config, validate_config
from diffusion.data.fingerprint import STATE_KEY as FINGERPRINT_KEY
from diffusion.models.factories import from_pipeline, pipeline_names
from diffusion.models.noise import INFERENCE_SCHEDULERS
from diffusion.models.rectified_flow import FLOW_SCHEDULERS
from diffusion.parallelism import clean_parameter_name

__all__ = [
    'CONDITIONING_FILE',
    'LoadedModel',
    'is_diffusers_folder',
    'load_checkpoint',
    'load_model',
    'scheduler_name',
]

log = logging.getLogger(__name__)

#: What an export records of its text conditioner beyond the pipeline's own configs (SD3: whether T5's padding is
#: masked), at the root of the folder, where diffusers does not look; a folder without it (one from the hub) loads
#: with the conditioner's diffusers-compatible defaults.
CONDITIONING_FILE = 'text_conditioning.json'


@dataclass
class LoadedModel:
    """A model ready for sampling, and what it was loaded from.

    Attributes:
        model: The model (e.g. :class:`~diffusion.models.StableDiffusion`) in eval mode on the requested device.
        weights (str): ``'ema'`` (the EMA average), ``'training'`` (the raw weights), or ``'pipeline'`` (a diffusers
            folder, whose weights are whatever was exported).
        source (str): The checkpoint or folder.
        config (DictConfig, optional): The training config of the run, when known.
        config_source (str, optional): Where the config came from (``'embedded in the checkpoint'`` or a path).
        batch (int, optional): The training batch at which the checkpoint was saved.
        has_ema (bool, optional): Whether the checkpoint holds EMA weights (``None`` for a diffusers folder).
        data_fingerprint (list, optional): The fingerprint of the training data (:mod:`diffusion.data.fingerprint`)
            that the checkpoint's dataset state records; ``None`` when it records none (a diffusers folder).
    """

    model: Any
    weights: str
    source: str
    config: Optional[DictConfig] = None
    config_source: Optional[str] = None
    batch: Optional[int] = None
    has_ema: Optional[bool] = None
    data_fingerprint: Optional[list[dict[str, Any]]] = None

    def describe(self) -> str:
        what = {'ema': 'EMA weights', 'training': 'training weights', 'pipeline': 'exported weights'}
        at = f' at batch {self.batch}' if self.batch is not None else ''
        config = f'; config {self.config_source}' if self.config_source else ''
        no_ema = ' (it has no EMA weights)' if self.has_ema is False else ''
        return f'{type(self.model).__name__}: {what[self.weights]} from {self.source}{no_ema}{at}{config}'


def is_diffusers_folder(path: str) -> bool:
    """Whether ``path`` is a local diffusers pipeline folder (has a ``model_index.json``)."""
    return os.path.isfile(os.path.join(path, 'model_index.json'))


def scheduler_name(scheduler: Any) -> str:
    """The project's name (``'ddim'``, ``'dpm++'``, ``'flow_euler'``, ...) for a diffusers scheduler instance;
    ``'ddim'`` if none fits."""
    for name, cls in FLOW_SCHEDULERS.items():
        if type(scheduler) is cls:
            return name
    for name, (cls, extra) in INFERENCE_SCHEDULERS.items():
        if type(scheduler) is cls and all(scheduler.config.get(k) == v for k, v in extra.items()):
            return name
    log.warning(
        'Scheduler %s has no name in INFERENCE_SCHEDULERS; sampling defaults to ddim.', type(scheduler).__name__
    )
    return 'ddim'


# -- diffusers folders -------------------------------------------------------------------------------------------
def _load_pipeline_folder(folder: str, device: str) -> LoadedModel:
    with open(os.path.join(folder, 'model_index.json')) as f:
        class_name = json.load(f).get('_class_name')
    if class_name not in pipeline_names():
        raise ValueError(
            f'{folder}/model_index.json names pipeline {class_name!r}; supported: {", ".join(pipeline_names())}.'
        )
    import diffusers

    # use_safetensors=True: a pickled .bin in the folder is refused rather than unpickled.
    pipe = getattr(diffusers, class_name).from_pretrained(folder, use_safetensors=True, local_files_only=True)
    conditioning = os.path.join(folder, CONDITIONING_FILE)
    conditioner_kwargs = None
    if os.path.isfile(conditioning):
        with open(conditioning) as f:
            conditioner_kwargs = json.load(f)
    model = from_pipeline(pipe, scheduler_name(pipe.scheduler), conditioner_kwargs)
    return LoadedModel(model.to(device).eval(), 'pipeline', folder)


# -- Composer checkpoints ----------------------------------------------------------------------------------------
def _fetch(checkpoint: str, folder: str) -> str:
    """A local path of ``checkpoint`` with its manifest beside it (downloaded when remote)."""
    if not parse_uri(checkpoint)[0]:
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f'Checkpoint not found: {checkpoint}')
        if os.path.isdir(checkpoint):
            latest = os.path.join(checkpoint, LATEST_CHECKPOINT)
            if not os.path.exists(latest):
                raise ValueError(
                    f'{checkpoint} is a folder with neither model_index.json (a diffusers pipeline) nor '
                    f'{LATEST_CHECKPOINT} (a Composer save folder). Sharded (FSDP) checkpoint folders are not '
                    'supported: save with `fsdp_state_dict_type: full` for inference.'
                )
            return latest
        return checkpoint
    local = os.path.join(folder, os.path.basename(parse_uri(checkpoint)[2]) or 'checkpoint.pt')
    try:
        get_file(checkpoint, local, overwrite=True)
    except FileNotFoundError:
        raise FileNotFoundError(f'Checkpoint not found: {checkpoint}') from None
    try:
        get_file(checkpoint + MANIFEST_SUFFIX, local + MANIFEST_SUFFIX, overwrite=True)
    except FileNotFoundError:
        raise UntrustedCheckpointError(
            f'{checkpoint} has no SHA-256 manifest {checkpoint}{MANIFEST_SUFFIX}; refusing to unpickle an untrusted '
            'checkpoint (loading a Composer checkpoint runs any code pickled in it). If you know where it comes from '
            f'and trust it, download it, sign the copy ({SIGN_COMMAND} FILE) and load that.'
        ) from None
    return local


def _read_state(path: str) -> dict[str, Any]:
    validate_checkpoint(path)  # raises before anything is unpickled
    # mmap: only the tensors that are used (the model's, the EMA's) are read from disk, not the optimizer state.
    contents = torch.load(os.path.realpath(path), map_location='cpu', weights_only=False, mmap=True)
    if not isinstance(contents, dict) or 'state' not in contents or 'model' not in contents['state']:
        raise ValueError(f'{path} is not a Composer checkpoint (no state.model).')
    return contents['state']


def _embedded_config(state: dict[str, Any]) -> Optional[str]:
    callbacks = state.get('callbacks') or {}
    return (callbacks.get(RunConfigInCheckpoint.__qualname__) or {}).get('config')


def _config_candidates(checkpoint: str) -> list[str]:
    """``config.yaml`` beside the checkpoint and up to two folders above it (``<run>/checkpoints/ep0-ba10.pt``)."""
    if parse_uri(checkpoint)[0]:
        return []
    candidates: list[str] = []
    for path in dict.fromkeys([os.path.abspath(checkpoint), os.path.realpath(checkpoint)]):
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        for _ in range(3):
            candidates.append(os.path.join(folder, CONFIG_FILENAME))
            folder = os.path.dirname(folder)
    return list(dict.fromkeys(candidates))


def _resolve_config(checkpoint: str, config: Optional[str], state: dict[str, Any]) -> tuple[DictConfig, str]:
    if config is not None:
        return load_config(config), config
    embedded = _embedded_config(state)
    if embedded is not None:
        return validate_config(OmegaConf.create(embedded)), 'embedded in the checkpoint'
    candidates = _config_candidates(checkpoint)
    for candidate in candidates:
        if os.path.isfile(candidate):
            return load_config(candidate), candidate
    searched = ', '.join(candidates) if candidates else '(nothing: the checkpoint is remote)'
    raise FileNotFoundError(
        f'No run config for {checkpoint}: it embeds none (saved before RunConfigInCheckpoint) and no '
        f'{CONFIG_FILENAME} was found; searched {searched}. Pass the training yaml with --config.'
    )


def _ema_state(state: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The state of an EMA algorithm that has started averaging, if the checkpoint has one."""
    algorithms = state.get('algorithms') or []
    for _, algorithm_state in algorithms.items() if isinstance(algorithms, dict) else algorithms:
        if isinstance(algorithm_state, dict) and 'ema_model' in algorithm_state:
            return algorithm_state if algorithm_state.get('ema_started') else None
    return None


def _checkpoint_weights(state: dict[str, Any], use_ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The model state dict to load and which weights it holds (``'ema'`` or ``'training'``)."""
    weights = {clean_parameter_name(k): v for k, v in state['model'].items()}
    ema = _ema_state(state)
    if ema is None:
        return weights, 'training'
    # Composer's EMA holds the other half of a swap: the training weights when the model holds the average.
    other = {**ema['ema_model'].get('named_buffers_dict', {}), **ema['ema_model']['named_parameters_dict']}
    model_holds_ema = bool(ema.get('ema_weights_active'))
    if use_ema != model_holds_ema:
        for name, value in other.items():
            name = clean_parameter_name(name)
            if name in weights:  # non-persistent buffers are swapped too but are not in the state dict
                weights[name] = value
    return weights, 'ema' if use_ema else 'training'


def _batch(state: dict[str, Any]) -> Optional[int]:
    timestamp = state.get('timestamp') or {}
    value = (timestamp.get('Timestamp') or {}).get('batch')
    return int(value) if value is not None else None


def _self_contained(model_cfg: Any, state: dict[str, Any], weights: dict[str, torch.Tensor], folder: str) -> Any:
    """The model config with its pretrained folder replaced by one rebuilt from the checkpoint, when the checkpoint
    records its pretrained components (:mod:`diffusion.callbacks.pretrained_components`): the model then builds
    whether or not the original folder still exists, from any working directory and without a model hub."""
    pretrained = pretrained_folder_from_checkpoint(model_cfg, state, weights, os.path.join(folder, 'pretrained'))
    if pretrained is None:
        return model_cfg
    components = sorted(os.listdir(pretrained))
    log.info(
        'Pretrained %s rebuilt from the checkpoint, not read from %s.',
        components,
        model_cfg.pretrained_model_name_or_path,
    )
    return OmegaConf.merge(model_cfg, {'pretrained_model_name_or_path': pretrained})


def _data_fingerprint(state: dict[str, Any]) -> Optional[list[dict[str, Any]]]:
    """The training data's fingerprint from the train dataset's state, which Composer saves as ``dataset_state``."""
    train = (state.get('dataset_state') or {}).get('train')
    fingerprint = train.get(FINGERPRINT_KEY) if isinstance(train, dict) else None
    return [dict(entry) for entry in fingerprint] if fingerprint else None


def load_checkpoint(
    checkpoint: str, config: Optional[str] = None, use_ema: bool = True, device: str = 'cpu'
) -> LoadedModel:
    """Load a model and say what was loaded; see :func:`load_model` for the arguments.

    Raises:
        FileNotFoundError: The checkpoint does not exist, or no run config was found (the message lists the paths
            searched).
        UntrustedCheckpointError: The checkpoint has no SHA-256 manifest signed with the checkpoint key, or differs
            from it.
        ValueError: The checkpoint's tensors do not fit the model its config builds: weights missing or unexpected
            (the message counts them and names a few) or of other shapes.
    """
    if not parse_uri(checkpoint)[0] and is_diffusers_folder(checkpoint):
        if config is not None:
            log.warning('--config has no effect on a diffusers folder, which holds its own configs.')
        loaded = _load_pipeline_folder(checkpoint, device)
    else:
        with tempfile.TemporaryDirectory() as folder:
            state = _read_state(_fetch(checkpoint, folder))
            cfg, config_source = _resolve_config(checkpoint, config, state)
            weights, kind = _checkpoint_weights(state, use_ema)
            base = base_record(state)
            if base is None:
                model = build_model(_self_contained(cfg.model, state, weights, folder))
            else:  # a frozen-base checkpoint: the base comes from where the run took it, and must be the same
                if not base.get('path'):  # built from its config and seed, as build_trainer seeds it
                    reproducibility.seed_all(cfg.seed)
                model = build_model(cfg.model)
                check_base(base, model, checkpoint, cfg.model.get('pretrained_model_name_or_path'))
                weights = complete_weights(weights, model)
            expected = set(model.state_dict())
            if set(weights) != expected:  # named, counted and cut short: torch's own message lists every key
                mismatch = describe_key_mismatch(expected - set(weights), set(weights) - expected)
                raise ValueError(
                    f'{checkpoint} does not fit the model built from its config ({config_source}): {mismatch}.'
                )
            try:
                model.load_state_dict(weights, strict=True)
            except RuntimeError as error:  # the names fit, the shapes do not
                raise ValueError(
                    f'{checkpoint} does not fit the model built from its config ({config_source}): {error}'
                ) from None
            has_ema = _ema_state(state) is not None
            loaded = LoadedModel(model.to(device).eval(), kind, checkpoint, cfg, config_source, _batch(state), has_ema)
            loaded.data_fingerprint = _data_fingerprint(state)
    log.info('Loaded %s', loaded.describe())
    return loaded


def load_model(checkpoint: str, config: Optional[str] = None, use_ema: bool = True, device: str = 'cpu') -> Any:
    """The model of a Composer checkpoint or a diffusers pipeline folder, in eval mode on ``device``.

    Args:
        checkpoint (str): A Composer checkpoint file (local path or object-store URI such as ``s3://bucket/run/
            checkpoints/ep1-ba1000-rank0.pt``), a local save folder (its ``latest-rank0.pt`` is used), or a
            diffusers pipeline folder (detected by its ``model_index.json``).
        config (str, optional): The training yaml, for checkpoints that embed no config and have no
            ``config.yaml`` in their run folder.
        use_ema (bool): Load the EMA weights when the checkpoint has them. Default: ``True``.
        device (str): Device to put the model on. Default: ``'cpu'``.
    """
    return load_checkpoint(checkpoint, config, use_ema, device).model
