"""FSDP for the diffusion models through Composer's ``parallelism_config``, applied from outside the model.

Composer wraps each child of a ``ComposerModel`` in its own FSDP root and, inside it, every module marked
``_fsdp_wrap = True``; it checkpoints activations of modules for which the child's ``activation_checkpointing_fn``
is true. :func:`mark_fsdp_units` sets those markers:

- the denoiser is sharded, one FSDP unit per block its :meth:`~diffusion.models.denoisers.Denoiser.fsdp_units`
  names (for the UNet each down block, the mid block and each up block: about 10 units for SD2, so only one
  block's full weights are gathered at a time), and activation checkpointing, when configured, covers the modules
  its ``activation_checkpointing_fn`` picks (the UNet's transformer and ResNet blocks);
- a frozen VAE or text encoder is left out of FSDP (``_fsdp_wrap = False``): it has no gradients to reduce and no
  optimizer state to shard, so replicating it (0.4B parameters for SD2) costs less than all-gathering it at every
  step; one that trains is sharded like the denoiser.

Composer's FSDP needs CUDA (it calls ``torch.cuda.current_device()``); on CPU :func:`resolve_parallelism` says so
and returns ``None``, so the run uses DDP (gloo) with the same config. Composer's FSDP2 (``fully_shard``, chosen
with ``FSDP_VERSION=2`` and the same ``fsdp`` section) also shards on CPU over gloo, so there the config is kept.
A ``parallelism_config.fsdp2`` section is refused: Composer's Trainer never reads it and would train unsharded.

:func:`unsharded` gives export a plain copy of a sharded component (FSDP or FSDP2), built from its full weights
gathered by every rank, since ``save_pretrained`` on a sharded module from rank 0 alone starts an all-gather that
no other rank joins (FSDP), or meets tensors it cannot save (FSDP2's DTensors).

The generic FSDP helpers that the EMA plugin, export and checkpoint loading share live here too:
:func:`clean_parameter_name` (names without the wrappers' segments), :func:`gather_dtensors` (FSDP2 shards gathered
whole) and :func:`full_parameters` (every top-level FSDP module's full parameters summoned). This module imports
nothing else of the package, so any layer above the models can use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Any, Iterator, Optional

import torch
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config, FSDPConfig, ParallelismConfig, TPConfig
from diffusers import ModelMixin
from torch.distributed.fsdp import FSDPModule, FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.tensor import DTensor

__all__ = [
    'check_parallelism_config',
    'clean_parameter_name',
    'full_parameters',
    'gather_dtensors',
    'mark_fsdp_units',
    'resolve_parallelism',
    'unsharded',
]

# Prefixes that FSDP and activation checkpointing insert into parameter names.
WRAPPER_PREFIXES = ('_fsdp_wrapped_module.', '_checkpoint_wrapped_module.', '_orig_mod.')

CPU_FSDP_MESSAGE = (
    'parallelism_config.fsdp is set but this run is on CPU: Composer runs FSDP on CUDA GPUs only. '
    'Training continues with DDP (each rank holds the full model); the FSDP settings apply on GPUs. '
    '(FSDP2, chosen with the environment variable FSDP_VERSION=2, also shards on CPU.)'
)
FSDP2_SECTION_MESSAGE = (
    "parallelism_config.fsdp2 is ignored by Composer's Trainer, which would train unsharded. For FSDP2, set the "
    'environment variable FSDP_VERSION=2 and configure parallelism_config.fsdp.'
)


def fsdp2_selected() -> bool:
    """Whether Composer turns ``parallelism_config.fsdp`` into FSDP2 (``fully_shard``): ``FSDP_VERSION=2``."""
    return os.environ.get('FSDP_VERSION', '1') == '2'


def mark_fsdp_units(model: Any) -> None:
    """Set Composer's FSDP wrapping and activation-checkpointing markers on a diffusion model's parts."""
    denoiser = model.denoiser
    for unit in denoiser.fsdp_units():
        unit._fsdp_wrap = True
    denoiser.network.activation_checkpointing_fn = denoiser.activation_checkpointing_fn
    for part in model.frozen_encoders():
        part._fsdp_wrap = any(p.requires_grad for p in part.parameters())


def check_parallelism_config(parallelism_config: Optional[dict[str, Any]]) -> None:
    """Fail on an unknown section or key: Composer's ``FSDPConfig`` would silently keep a misspelled key."""
    sections = [f.name for f in dataclasses.fields(ParallelismConfig) if f.name != 'fsdp2']
    for section, options in (parallelism_config or {}).items():
        if section == 'fsdp2':  # a field of ParallelismConfig that the Trainer's dict handling never reads
            raise ValueError(FSDP2_SECTION_MESSAGE)
        if section not in sections:
            raise ValueError(f'Unknown key parallelism_config.{section}. Valid keys: {", ".join(sections)}.')
        if section == 'tp':
            schemas = [TPConfig]
        else:  # FSDP2 takes its own keys too (Composer drops FSDP-only ones from it with a warning)
            schemas = [FSDPConfig, FSDP2Config] if fsdp2_selected() else [FSDPConfig]
        valid = list(dict.fromkeys(f.name for schema in schemas for f in dataclasses.fields(schema)))
        valid = [name for name in valid if not name.startswith('_')]
        for key in options or {}:
            if key not in valid:
                raise ValueError(f'Unknown key parallelism_config.{section}.{key}. Valid keys: {", ".join(valid)}.')


def resolve_parallelism(parallelism_config: Optional[dict[str, Any]], device: str, model: Any) -> Optional[dict]:
    """The parallelism config to give the Trainer: FSDP markers set on GPU (and for FSDP2 on CPU too, where it
    runs over gloo), FSDP dropped with a message on CPU."""
    check_parallelism_config(parallelism_config)
    if not parallelism_config or not parallelism_config.get('fsdp'):
        return parallelism_config or None
    if device != 'gpu' and not fsdp2_selected():
        warnings.warn(CPU_FSDP_MESSAGE, stacklevel=2)
        if dist.get_global_rank() == 0:
            print(CPU_FSDP_MESSAGE, flush=True)
        rest = {key: value for key, value in parallelism_config.items() if key != 'fsdp'}
        return rest or None
    mark_fsdp_units(model)
    return parallelism_config


def clean_parameter_name(name: str) -> str:
    """``name`` without the wrapper segments FSDP, checkpoint wrappers and ``torch.compile`` insert."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, '')
    return name


def gather_dtensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every DTensor (FSDP2's shards) gathered whole into CPU memory: a collective of all ranks."""
    return {name: t.full_tensor().cpu() if isinstance(t, DTensor) else t for name, t in tensors.items()}


def _top_level_fsdp(module: torch.nn.Module) -> Iterator[FSDP]:
    for child in module.children():
        if isinstance(child, FSDP):
            yield child
        else:
            yield from _top_level_fsdp(child)


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Summon the full parameters of every top-level FSDP module in ``model``, written back on exit."""
    with contextlib.ExitStack() as stack:
        for module in [model] if isinstance(model, FSDP) else list(_top_level_fsdp(model)):
            stack.enter_context(FSDP.summon_full_params(module, writeback=True, recurse=True))
        yield


def _plain_class(module: torch.nn.Module) -> type:
    """The module's own class: ``fully_shard`` (FSDP2) swaps in a subclass named ``FSDP<class>``."""
    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def unsharded(component: torch.nn.Module) -> Optional[torch.nn.Module]:
    """``component`` as a plain module that ``save_pretrained`` can write: itself when nothing in it is sharded.

    When FSDP shards it (Composer wraps the denoiser, and any encoder that trains), every rank must call this, since
    gathering the full weights is a collective. Under FSDP (``parallelism_config.fsdp``) torch's full state dict is
    gathered, kept by rank 0 alone (in CPU memory when training on GPUs); under FSDP2 (``FSDP_VERSION=2``,
    parameters are DTensors) each tensor's ``full_tensor()`` is. Rank 0 gets a copy of the component's own class,
    built from its config on the meta device and given those tensors; other ranks get ``None``. Parameter names
    lose the FSDP and activation-checkpointing wrappers' segments.
    """
    fsdp = any(isinstance(module, FSDP) for module in component.modules())
    fsdp2 = any(isinstance(parameter, DTensor) for parameter in component.parameters())
    if not fsdp and not fsdp2:
        return component
    if fsdp:
        # Offloading GPU tensors to CPU saves rank 0's GPU memory; on CPU torch's offload path crashes (SIGSEGV).
        on_gpu = any(parameter.is_cuda for parameter in component.parameters())
        config = FullStateDictConfig(offload_to_cpu=on_gpu, rank0_only=True)
        with FSDP.state_dict_type(component, StateDictType.FULL_STATE_DICT, config):
            state_dict = component.state_dict()
    else:
        state_dict = {name: tensor.cpu() for name, tensor in gather_dtensors(component.state_dict()).items()}
    if dist.get_global_rank() != 0:
        return None
    inner = component.module if isinstance(component, FSDP) else component
    cls = _plain_class(inner)
    with torch.device('meta'):  # no memory and no initialisation: every tensor is replaced below
        plain = cls.from_config(inner.config) if issubclass(cls, ModelMixin) else cls(inner.config)
    plain.load_state_dict({clean_parameter_name(k): v for k, v in state_dict.items()}, strict=True, assign=True)
    left = [name for name, tensor in plain.state_dict().items() if tensor.is_meta]
    if left:
        raise RuntimeError(f'Unsharding {cls.__name__}: no full tensor for {", ".join(left[:5])}.')
    return plain.train(inner.training)
