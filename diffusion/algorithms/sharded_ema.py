"""Composer's EMA, made to work when the model's children are FSDP-sharded.

Composer's ``EMA`` (with ``ema_start``, the paper's scheduled EMA) reaches full parameters under FSDP through
``model.module.summon_full_params``, which assumes the FSDP wrapper is the model itself. Composer's own FSDP
integration wraps the *children* of a ``ComposerModel`` instead (the denoiser, ``vae``, ``text_encoder``), so with a
sharded UNet that call fails (``'StableDiffusion' object has no attribute 'module'``) at the first EMA update, and
the parameter names carry FSDP's ``_fsdp_wrapped_module.`` prefixes, so the EMA state of a sharded run would not
load into an unsharded one. This subclass keeps every Composer behaviour (events, ``ema_start``, swapping for
evaluation and checkpoints, state dict) and only changes how the model is seen: all FSDP children's full
parameters are summoned (with write-back) around each EMA step, and names are given without FSDP's prefixes.

Without FSDP it behaves exactly like Composer's EMA. Cost under FSDP: one all-gather of the trained parameters per
EMA update (the same as Composer's approach for a root-wrapped model), and a full copy of them on every rank.

Under FSDP2 (``fully_shard``, Composer's ``FSDP_VERSION=2``) parameters are DTensors and keep their names, so
Composer's averaging works shard by shard and no gathering is needed per update. But its state dict would hold this
rank's shards, and a full checkpoint (written by rank 0) would hand every rank rank 0's shards on resume; here the
averages are saved whole (gathered on every rank as the checkpoint is taken) and sharded again like the model's
parameters when training starts.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from composer.algorithms import EMA
from composer.core import Event, State
from composer.loggers import Logger
from torch.distributed.tensor import DTensor, distribute_tensor

from diffusion.parallelism import clean_parameter_name, full_parameters, gather_dtensors

__all__ = ['ShardedEMA']


class _FullParameterView:
    """What Composer's EMA helpers use of a model: its parameters and buffers by clean name. It has no children,
    so those helpers do not try a ``summon_full_params`` of their own (:class:`ShardedEMA` holds one for all)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def named_children(self) -> Iterator[tuple[str, torch.nn.Module]]:
        return iter(())

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for name, parameter in self.model.named_parameters():
            yield clean_parameter_name(name), parameter

    def named_buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, buffer in self.model.named_buffers():
            yield clean_parameter_name(name), buffer


class _StateView:
    """``state`` with ``model`` replaced by a :class:`_FullParameterView` of it; everything else is the state's."""

    def __init__(self, state: State):
        self._state = state
        self.model = _FullParameterView(state.model)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


class ShardedEMA(EMA):
    """Composer's :class:`~composer.algorithms.EMA`, also correct when the model's children are FSDP-sharded.

    Takes Composer's arguments (``half_life``, ``smoothing``, ``ema_start``, ``update_interval``).
    """

    def match(self, event: Event, state: State) -> bool:
        # Only the first update after ema_start reads the model in match (to copy it); other events are cheap.
        starting = event == self.update_event and not self.ema_started
        with full_parameters(state.model) if starting else contextlib.nullcontext():
            return super().match(event, _StateView(state))  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        # Under FSDP2 the averages are DTensors holding this rank's shard, and a full (rank-0) checkpoint would give
        # every rank rank 0's shards on resume; they are saved whole (gathered on every rank, as checkpointing is).
        state = super().state_dict()
        if isinstance(state.get('ema_model'), dict):
            state['ema_model'] = {key: gather_dtensors(tensors) for key, tensors in state['ema_model'].items()}
        return state

    def _reshard(self, state: State) -> None:
        """Give loaded (whole) averages the sharding of the model's DTensor parameters again (FSDP2)."""
        if self.ema_model is None:
            return
        parameters = dict(_FullParameterView(state.model).named_parameters())
        averages = self.ema_model.named_parameters_dict
        for name, tensor in averages.items():
            parameter = parameters.get(name)
            if isinstance(parameter, DTensor) and not isinstance(tensor, DTensor):
                averages[name] = distribute_tensor(
                    tensor.to(parameter.device), parameter.device_mesh, parameter.placements
                )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:  # after a checkpoint was loaded, before the first update
            self._reshard(state)
        with full_parameters(state.model):
            super().apply(event, _StateView(state), logger)  # type: ignore[arg-type]

    def _swap(self, state: Any, to_ema: bool) -> None:
        """Swap weights; from ``apply`` (a state view, parameters already summoned) or from a callback."""
        if isinstance(state, _StateView):
            swap = super()._ensure_ema_weights_active if to_ema else super()._ensure_training_weights_active
            swap(state)  # type: ignore[arg-type]
            return
        view = _StateView(state)
        with full_parameters(state.model):
            if to_ema and self.ema_model is not None:
                self.ema_model.move_params_to_device(destination_model=view.model)  # type: ignore[arg-type]
            self._swap(view, to_ema)

    def _ensure_training_weights_active(self, state: Any) -> None:
        self._swap(state, to_ema=False)

    def _ensure_ema_weights_active(self, state: Any) -> None:
        self._swap(state, to_ema=True)
