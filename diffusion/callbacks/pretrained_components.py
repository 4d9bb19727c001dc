"""Make a checkpoint rebuild its model without the pretrained folder it was trained from.

A run with ``model.pretrained_model_name_or_path`` builds some components (the demo's VAE, SD2's VAE, text encoder
and tokenizer) with ``from_pretrained`` from a folder or hub id. The checkpoint holds every weight, those components'
included, but rebuilding the model for inference from the run's config would load them from that folder again: it
fails when the folder moved, was deleted, or was named by a path relative to another working directory (the demo's
``runs/demo_autoencoder/pretrained``), and a hub id needs the network.

:class:`PretrainedComponentsInCheckpoint` stores in every checkpoint what those components need besides their
weights: each one's configuration files (a model's ``config.json``, a tokenizer's vocabulary and settings, as their
``save_config`` / ``save_pretrained`` write them) and where its weights sit in the model's state dict (a few KB, or
about 1.5 MB for a CLIP tokenizer). :func:`pretrained_folder_from_checkpoint` rebuilds a diffusers-style folder of
those components from the record and the checkpoint's weights, which inference loading then builds the model from
in place of the original folder.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any, Optional

import torch
from composer import Callback
from safetensors.torch import save_file
from torch import nn

__all__ = ['PretrainedComponentsInCheckpoint', 'pretrained_folder_from_checkpoint', 'record_pretrained_components']

DIFFUSERS_WEIGHTS = 'diffusion_pytorch_model.safetensors'
TRANSFORMERS_WEIGHTS = 'model.safetensors'


def _loaded_from_pretrained(component: Any) -> bool:
    """Whether ``from_pretrained`` made ``component`` (diffusers and transformers record where it came from)."""
    config = getattr(component, 'config', None)
    if isinstance(config, Mapping):  # diffusers: a FrozenDict with _name_or_path
        return bool(config.get('_name_or_path'))
    if config is not None:  # transformers models
        return bool(getattr(config, '_name_or_path', ''))
    return bool(getattr(component, 'name_or_path', ''))  # tokenizers


def _read_folder(folder: str) -> dict[str, bytes]:
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def _record(component: Any, prefix: Optional[str]) -> Optional[dict[str, Any]]:
    """What rebuilding ``component`` needs besides its weights, or ``None`` for a kind this cannot store."""
    with tempfile.TemporaryDirectory() as folder:
        if isinstance(component, nn.Module) and hasattr(component, 'save_config'):  # diffusers ModelMixin
            component.save_config(folder)
            weights = DIFFUSERS_WEIGHTS
        elif isinstance(component, nn.Module) and hasattr(getattr(component, 'config', None), 'save_pretrained'):
            component.config.save_pretrained(folder)  # transformers PreTrainedModel
            weights = TRANSFORMERS_WEIGHTS
        elif not isinstance(component, nn.Module) and hasattr(component, 'save_pretrained'):  # tokenizers
            component.save_pretrained(folder)
            weights = None
        else:
            return None
        if weights is not None and prefix is None:
            return None
        return {'files': _read_folder(folder), 'weights_file': weights, 'prefix': prefix}


def record_pretrained_components(model: Any, model_config: Any) -> dict[str, dict[str, Any]]:
    """Per component that ``model`` loaded from ``model.pretrained_model_name_or_path``: its configuration files,
    the weights file name its library expects, and the prefix of its weights in the model's state dict.

    The components are those ``pretrained_components`` names and those that report being loaded with
    ``from_pretrained`` (which covers a factory's default list); empty when the config names no pretrained folder
    or the model has no diffusers ``pipeline()``.
    """
    config = model_config if isinstance(model_config, Mapping) else {}
    if not config.get('pretrained_model_name_or_path') or not hasattr(model, 'pipeline'):
        return {}
    named = set(config.get('pretrained_components') or ())
    components = {k: v for k, v in model.pipeline().components.items() if v is not None}
    prefixes = {id(module): name for name, module in model.named_modules() if name}
    records = {}
    for name, component in components.items():
        if name in named or _loaded_from_pretrained(component):
            record = _record(component, prefixes.get(id(component)))
            if record is not None:
                records[name] = record
    return records


class PretrainedComponentsInCheckpoint(Callback):
    """Store :func:`record_pretrained_components` of the run's model in every checkpoint.

    Composer saves it under ``state['callbacks']['PretrainedComponentsInCheckpoint']``; loading a checkpoint to
    resume keeps the resuming run's own record.

    Args:
        model: The model the run trains, before any wrapping (FSDP, compile).
        model_config: The run's ``model`` section.
    """

    def __init__(self, model: Any, model_config: Any):
        self.components = record_pretrained_components(model, model_config)

    def state_dict(self) -> dict[str, Any]:
        return {'components': self.components}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state  # the resumed run's own components are the ones to record


def pretrained_folder_from_checkpoint(
    model_config: Any, state: Mapping[str, Any], weights: Mapping[str, torch.Tensor], folder: str
) -> Optional[str]:
    """Write the run's pretrained components into ``folder`` from a checkpoint; return it, or ``None`` if unable.

    Args:
        model_config: The run's ``model`` section.
        state (Mapping): The checkpoint's ``state`` (its callbacks' states hold the record).
        weights (Mapping[str, Tensor]): The model state dict about to be loaded (names without wrapper prefixes).
        folder (str): An empty folder to write ``<component>/config.json``, weights and tokenizer files into.

    Returns:
        ``folder``, to build the model with in place of ``pretrained_model_name_or_path``; ``None`` when the run
        loaded nothing pretrained, or the checkpoint predates the record or lacks one of the components the config
        loads (the original folder is then needed).
    """
    record = ((state.get('callbacks') or {}).get(PretrainedComponentsInCheckpoint.__qualname__) or {}).get('components')
    config = model_config if isinstance(model_config, Mapping) else {}
    if not record or not config.get('pretrained_model_name_or_path'):
        return None
    if not set(config.get('pretrained_components') or ()) <= set(record):
        return None
    for name, component in record.items():
        subfolder = os.path.join(folder, name)
        os.makedirs(subfolder, exist_ok=True)
        for file_name, contents in component['files'].items():
            if os.path.isabs(file_name) or os.path.normpath(file_name).startswith('..'):
                raise ValueError(f'The checkpoint names a {name} file outside its folder: {file_name!r}.')
            path = os.path.join(subfolder, file_name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, 'wb') as f:
                f.write(contents)
        if component['weights_file']:
            prefix = f'{component["prefix"]}.'
            tensors = {k[len(prefix) :]: v.contiguous() for k, v in weights.items() if k.startswith(prefix)}
            if not tensors:
                return None
            save_file(tensors, os.path.join(subfolder, component['weights_file']))
    return folder
