"""Evaluation: the deterministic prompt-following checker and prompt files."""

from diffusion.evaluation.prompt_following import (
    DEMO_PROMPTS_PATH,
    dominant_color,
    dominant_shape,
    load_prompts,
    parse_prompt,
    score_prompt_following,
)

__all__ = [
    'DEMO_PROMPTS_PATH',
    'dominant_color',
    'dominant_shape',
    'load_prompts',
    'parse_prompt',
    'score_prompt_following',
]
