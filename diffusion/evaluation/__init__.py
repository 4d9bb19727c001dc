"""Evaluation: the deterministic prompt-following checker, prompt sets, image metrics and the human study.

The names below are imported on first use (PEP 562), so that ``python -m diffusion.evaluation.human_eval`` starts
without importing torch.
"""

import importlib
from typing import Any

_EXPORTS = {
    'DEMO_PROMPTS_PATH': 'diffusion.evaluation.prompt_following',
    'dominant_color': 'diffusion.evaluation.prompt_following',
    'dominant_shape': 'diffusion.evaluation.prompt_following',
    'load_prompts': 'diffusion.evaluation.prompt_following',
    'parse_prompt': 'diffusion.evaluation.prompt_following',
    'score_prompt_following': 'diffusion.evaluation.prompt_following',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
