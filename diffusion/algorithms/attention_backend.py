"""Choose the kernel behind every diffusers attention layer: PyTorch SDPA, xFormers, or plain matmul + softmax.

Sets the processor of each diffusers ``Attention`` module in the model (the UNet's self- and cross-attention, and
the VAE's mid-block attention where it has one) with diffusers' ``Attention.set_processor``. The weights and the
maths do not change, only the kernel: outputs agree to float rounding (below 1e-6 in fp32 on the test model).

* ``'sdpa'``: ``AttnProcessor2_0``, PyTorch's ``scaled_dot_product_attention``, which picks the flash or
  memory-efficient kernel on GPU. Diffusers' default, so on a freshly built model it changes nothing.
* ``'xformers'``: ``XFormersAttnProcessor``, xFormers' memory-efficient attention; needs the ``xformers`` extra
  and a CUDA device.
* ``'math'``: ``AttnProcessor``, a batched matmul and softmax that materialises the (B * heads, N, N) attention
  matrix: quadratic memory in the number of latent pixels, for debugging and reference numerics.

Has no effect on a model without diffusers attention modules (a warning says so), and none on the text encoder,
whose attention is chosen by transformers' ``attn_implementation``. Processors that carry their own logic or
weights (added-KV, IP-Adapter, LoRA, custom diffusion) are never replaced: the function refuses such a model.
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import torch
from composer.algorithms.warnings import NoEffectWarning
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)
from diffusers.utils import is_xformers_available

log = logging.getLogger(__name__)

__all__ = ['ATTENTION_BACKENDS', 'AttentionBackend', 'apply_attention_backend']

ATTENTION_BACKENDS = {'sdpa': AttnProcessor2_0, 'xformers': XFormersAttnProcessor, 'math': AttnProcessor}

# Processors that compute plain self- or cross-attention from the module's own projections: swapping one for
# another changes the kernel only. Anything else adds inputs or weights that a swap would silently drop.
_PLAIN_PROCESSORS = (AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor, SlicedAttnProcessor)


def _check_backend(backend: str) -> None:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f'Unknown attention backend {backend!r}. Valid backends: {", ".join(ATTENTION_BACKENDS)}.')
    if backend == 'xformers' and not is_xformers_available():
        raise ImportError(
            "Attention backend 'xformers' needs the xformers package: pip install -e '.[xformers]' "
            "(or choose backend 'sdpa', which uses PyTorch's own memory-efficient kernels)."
        )


def apply_attention_backend(model: torch.nn.Module, backend: str = 'sdpa') -> int:
    """Set the attention processor of every diffusers ``Attention`` module in ``model`` to ``backend``'s.

    Args:
        model (torch.nn.Module): Any module; typically a :class:`~diffusion.models.StableDiffusion`.
        backend (str): ``'sdpa'``, ``'xformers'`` or ``'math'``. Default: ``'sdpa'``.

    Returns:
        int: The number of attention modules whose processor was set.

    Raises:
        ValueError: For an unknown backend, or when a module holds a processor other than a plain attention one.
        ImportError: For ``'xformers'`` when xformers is not installed.
    """
    _check_backend(backend)
    attention = [(name, module) for name, module in model.named_modules() if isinstance(module, Attention)]
    custom = [
        f'{name} ({type(module.processor).__name__})'
        for name, module in attention
        if not isinstance(module.processor, _PLAIN_PROCESSORS)
    ]
    if custom:
        raise ValueError(
            f'Cannot set attention backend {backend!r}: these modules use processors with their own inputs or '
            f'weights, which it would drop: {", ".join(custom)}.'
        )
    if not attention:
        warnings.warn(NoEffectWarning('AttentionBackend: the model has no diffusers Attention modules.'), stacklevel=2)
        return 0
    processor = ATTENTION_BACKENDS[backend]()  # stateless, so one instance serves every module
    for _, module in attention:
        module.set_processor(processor)
    log.info(f'Set the attention processor of {len(attention)} modules to {type(processor).__name__}.')
    return len(attention)


class AttentionBackend(Algorithm):
    """Pick the attention kernel of the model's diffusers attention layers at ``Event.INIT``.

    See :func:`apply_attention_backend`. Example yaml: ``algorithms: {attention_backend: {backend: math}}``.

    Args:
        backend (str): ``'sdpa'`` (PyTorch ``scaled_dot_product_attention``), ``'xformers'`` or ``'math'``.
            Default: ``'sdpa'``.
    """

    def __init__(self, backend: str = 'sdpa'):
        _check_backend(backend)  # fail when the config is read, not after the model is built
        self.backend = backend

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}(backend={self.backend!r})'

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> Optional[int]:
        apply_attention_backend(state.model, self.backend)
