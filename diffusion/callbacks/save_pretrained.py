"""Save model components at the end of training in the diffusers/transformers folder format.

Builds on Composer's ``Callback`` and the ``save_pretrained`` of diffusers and transformers (safetensors weights
plus config). The folder layout is a diffusers pipeline's (``<folder>/vae``, ``<folder>/text_encoder``, ...), so that
another run loads it with ``pretrained_model_name_or_path=<folder>``; the demo hands its trained autoencoder to
the diffusion run this way. A component that FSDP shards is exported through
:func:`diffusion.parallelism.unsharded`, which every rank joins.
"""

from __future__ import annotations

import os
from typing import Sequence

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from diffusion.callbacks.ema_weights import ema_weights
from diffusion.parallelism import unsharded
from diffusion.utils import unwrap_model

__all__ = ['SavePretrained']


class SavePretrained(Callback):
    """At fit end, rank 0 writes ``<folder>/<component>`` for each named component of the model.

    Args:
        folder (str): Output folder.
        components (Sequence[str]): Attribute names of the model to save (``'vae'``, ``'text_encoder'``, ...).
        use_ema (bool): Export the EMA weights when an ``ema`` algorithm has started (what the paper releases).
            Default: ``True``.
    """

    def __init__(self, folder: str, components: Sequence[str] = ('vae',), use_ema: bool = True):
        self.folder = folder
        self.components = list(components)
        self.use_ema = use_ema

    def fit_end(self, state: State, logger: Logger) -> None:
        model = unwrap_model(state.model)
        for name in self.components:
            if not hasattr(getattr(model, name, None), 'save_pretrained'):
                raise ValueError(f'SavePretrained: the model has no component {name!r} with save_pretrained.')
        if hasattr(model, 'prepare_for_export'):
            model.prepare_for_export()
        with ema_weights(state, self.use_ema):
            for name in self.components:
                component = unsharded(getattr(model, name))  # every rank: a collective when FSDP shards it
                if dist.get_global_rank() == 0:
                    component.save_pretrained(os.path.join(self.folder, name))
            dist.barrier()
