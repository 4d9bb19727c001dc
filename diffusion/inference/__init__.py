"""Inference: load a checkpoint or exported folder, sample prompt sets to PNGs, export diffusers pipelines, try a
model in a local web app (``python -m diffusion.inference.app``).

``sample_to_folder`` and ``export_model`` are imported on first use, so that ``python -m diffusion.inference.sample``
and ``python -m diffusion.inference.export`` run their module once (not also as an attribute of this package).
"""

from typing import Any

from diffusion.checkpointing import RunConfigInCheckpoint
from diffusion.inference.loading import LoadedModel, load_checkpoint, load_model
from diffusion.inference.model_card import write_model_card
from diffusion.models.single_file import pipeline_to_ldm, save_single_file

__all__ = [
    'LoadedModel',
    'RunConfigInCheckpoint',
    'export_model',
    'load_checkpoint',
    'load_model',
    'pipeline_to_ldm',
    'sample_to_folder',
    'save_single_file',
    'write_model_card',
]

_LAZY = {'export_model': 'diffusion.inference.export', 'sample_to_folder': 'diffusion.inference.sample'}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
