"""Compile the denoiser with ``torch.compile``, in place, so that parameter names and checkpoints do not change.

Calls ``nn.Module.compile`` on the denoising network, which compiles the module's call rather than wrapping it in an
``OptimizedModule``: ``state_dict`` keys, EMA copies and checkpoints stay exactly as without compiling, and a
checkpoint saved with compilation loads without it and vice versa. Only the denoiser is compiled; the frozen VAE and
text encoder, and the noising around the denoiser, run eagerly. Compilation is lazy: it happens at the first step,
after every other ``Event.INIT`` algorithm (attention backend, gradient checkpointing) has changed the model.

Costs compile time at the first step, and again whenever input shapes change (another resolution or
microbatch size) unless ``dynamic=True``: inductor took about two minutes for the forward and two for the backward
of the test-size UNet on a 2-core CPU. Inductor needs a C++ compiler on CPU and Triton on GPU. Builds on PyTorch's
``torch.compile``. Composer's Trainer ``compile_config`` instead compiles the whole model's ``forward``, caption
tokenizing and frozen encoders included; this algorithm keeps the compiled region to the network that trains.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from diffusion.models import get_denoiser

log = logging.getLogger(__name__)

__all__ = ['CompileDenoiser', 'apply_compile_denoiser']


def apply_compile_denoiser(model: torch.nn.Module, **compile_kwargs: Any) -> None:
    """Compile the denoiser of ``model`` in place with ``nn.Module.compile``.

    Args:
        model (torch.nn.Module): A :class:`~diffusion.models.StableDiffusion`.
        **compile_kwargs: Arguments of ``torch.compile`` (``mode``, ``fullgraph``, ``dynamic``, ``backend``, ...).

    Raises:
        ValueError: If the model has no denoiser.
    """
    denoiser = get_denoiser(model, 'CompileDenoiser')
    denoiser.compile(**compile_kwargs)
    log.info(f'Compiling {type(denoiser.network).__name__} with torch.compile({compile_kwargs}) at its first call.')


class CompileDenoiser(Algorithm):
    """Compile the denoiser in place at ``Event.INIT``; see :func:`apply_compile_denoiser`.

    Example yaml: ``algorithms: {compile_denoiser: {mode: max-autotune-no-cudagraphs}}``.

    Args:
        mode (str, optional): ``torch.compile`` mode: ``'default'``, ``'reduce-overhead'`` (CUDA graphs),
            ``'max-autotune'``, ``'max-autotune-no-cudagraphs'``. Default: ``None`` (PyTorch's default).
        fullgraph (bool): Fail on a graph break instead of falling back to eager for that part. Default: ``False``.
        dynamic (bool, optional): Compile for dynamic shapes (``True``), static ones (``False``), or let PyTorch
            decide after a recompilation (``None``). Default: ``None``.
        backend (str): ``torch.compile`` backend; ``'aot_eager'`` checks tracing without generating code.
            Default: ``'inductor'``.
    """

    def __init__(
        self,
        mode: Optional[str] = None,
        fullgraph: bool = False,
        dynamic: Optional[bool] = None,
        backend: str = 'inductor',
    ):
        self.mode = mode
        self.fullgraph = fullgraph
        self.dynamic = dynamic
        self.backend = backend

    def __repr__(self) -> str:
        return (
            f'{self.__class__.__name__}(mode={self.mode!r}, fullgraph={self.fullgraph}, dynamic={self.dynamic}, '
            f'backend={self.backend!r})'
        )

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> Optional[int]:
        apply_compile_denoiser(
            state.model, mode=self.mode, fullgraph=self.fullgraph, dynamic=self.dynamic, backend=self.backend
        )
