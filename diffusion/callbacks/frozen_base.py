"""Checkpoints of a frozen-base run (an adapter such as ``lora``): the trainable weights plus a reference to the base.

A run whose ``model.adapters`` freeze the base trains a few megabytes of weights on top of gigabytes that never
change. :class:`FrozenBaseCheckpoint` makes its checkpoints hold only the trainable weights (Composer's EMA and the
optimizer already hold nothing else) and a record of the base they were trained on:

- ``path``: the model's ``pretrained_model_name_or_path`` (``None`` for a base built from its config and seed), and
  the model's registry name;
- ``sha256``: :func:`diffusion.models.lora.base_digest` of every frozen weight (name, dtype, shape, bytes), under
  the names the model has without its adapters, computed once when the run starts (a few seconds for SD2).

Loading (a resume, ``load_path``, or :func:`diffusion.inference.loading.load_checkpoint`) rebuilds the model from
the config, so the base comes from the same folder (or seed) again. Its digest must be the recorded one, else the
load is refused in one line naming both bases; then the frozen weights the checkpoint left out are taken from the
rebuilt model itself, and :class:`~diffusion.checkpointing.StrictModelWeights` still sees, and strictly loads, a
complete state dict. A checkpoint that holds every weight (an older one, or one saved with sharded FSDP state dicts,
which this leaves whole) loads as before.

Builds on Composer's ``State.get_model_state_dict`` / ``State.load_model_state`` (wrapped at ``INIT``, as
``StrictModelWeights`` wraps the latter) and on Composer saving each callback's ``state_dict`` in the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Optional

import torch
from composer import Callback
from composer.core import State
from composer.loggers import Logger
from torch import nn

from diffusion import checkpointing
from diffusion.models.lora import base_digest
from diffusion.parallelism import clean_parameter_name

__all__ = ['BaseMismatchError', 'FrozenBaseCheckpoint', 'base_record', 'check_base', 'complete_weights']

log = logging.getLogger(__name__)


class BaseMismatchError(ValueError):
    """A frozen-base checkpoint meets a model whose base weights are not the ones it was trained on."""


def _describe(record: Mapping[str, Any]) -> str:
    where = record.get('path') or f'{record.get("model")} built from its config'
    return f'{where} (sha256 {record.get("sha256")})'


def base_record(state: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The base reference a checkpoint's ``state`` records, or ``None`` for a checkpoint that holds every weight."""
    return ((state.get('callbacks') or {}).get(FrozenBaseCheckpoint.__qualname__) or {}).get('base')


def _trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def check_base(record: Mapping[str, Any], model: nn.Module, where: str, path: Optional[str] = None) -> None:
    """Raise :class:`BaseMismatchError` when ``model``'s frozen weights are not the base ``record`` names."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    digest = base_digest(model, exclude=_trainable(model))
    if digest != record.get('sha256'):
        ours = {'path': path, 'model': record.get('model'), 'sha256': digest}
        raise BaseMismatchError(
            f"{where} was trained on the base {_describe(record)}, but this model's base is {_describe(ours)}; "
            'build the model on the same base (pretrained_model_name_or_path, config and seed).'
        )


def complete_weights(weights: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``weights`` (trainable ones) plus ``model``'s own values for every name they lack (its frozen base)."""
    names = {clean_parameter_name(k) for k in weights}
    own = {clean_parameter_name(k): v for k, v in model.state_dict().items()}
    return {**{k: v for k, v in own.items() if k not in names}, **weights}


class FrozenBaseCheckpoint(Callback):
    """Save only the trainable weights and the base's reference; load them onto a verified base.

    Args:
        model (nn.Module): The run's model, adapters applied, before any wrapping.
        model_config (Mapping): The run's ``model`` section (for the base's path and name).
    """

    def __init__(self, model: nn.Module, model_config: Optional[Mapping[str, Any]] = None):
        config = model_config if isinstance(model_config, Mapping) else {}
        self.trainable = sorted(clean_parameter_name(n) for n, p in model.named_parameters() if p.requires_grad)
        frozen = sorted(clean_parameter_name(n) for n in model.state_dict() if clean_parameter_name(n) not in
                        set(self.trainable))  # fmt: skip
        self.path = config.get('pretrained_model_name_or_path')
        self.base = {
            'path': self.path,
            'model': config.get('name'),
            'sha256': base_digest(model, exclude=_trainable(model)),
            'weights': len(frozen),
        }

    def state_dict(self) -> dict[str, Any]:
        return {'base': dict(self.base), 'trainable': list(self.trainable)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state  # checked when the model state loads (below), before the weights do

    def init(self, state: State, logger: Logger) -> None:
        del logger  # unused
        get_model_state_dict = state.get_model_state_dict
        load_model_state = state.load_model_state
        keep = set(self.trainable)

        def trimmed_model_state_dict() -> dict[str, Any]:
            model_state = get_model_state_dict()
            if state.fsdp_sharded_state_dict_enabled:
                return model_state  # sharded loads read every name of the model: keep the checkpoint whole
            return {k: v for k, v in model_state.items() if clean_parameter_name(k) in keep}

        def verified_load_model_state(state_dict: dict[str, Any], logger: Logger, *args: Any, **kwargs: Any) -> Any:
            record = base_record(state_dict)
            model_state = state_dict.get('model')
            if record is not None and model_state is not None:
                where = checkpointing._last_validated or 'The checkpoint being loaded'
                check_base(record, state.model, where, self.path)
                model = state.model
                model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
                state_dict = {**state_dict, 'model': complete_weights(model_state, model)}
            return load_model_state(state_dict, logger, *args, **kwargs)

        state.get_model_state_dict = trimmed_model_state_dict  # type: ignore[method-assign]
        state.load_model_state = verified_load_model_state  # type: ignore[method-assign]
