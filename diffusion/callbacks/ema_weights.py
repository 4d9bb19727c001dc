"""Use Composer's EMA weights outside evaluation: sampling callbacks and export see the averaged model.

Composer's ``EMA`` algorithm (with ``ema_start`` for the paper's scheduled EMA) swaps its weights in for evaluation
and checkpoints, but callbacks that sample during training or export at the end would see the raw training
weights. :func:`ema_weights` swaps the EMA weights in for a block and back afterwards, through the algorithm's own
swap (:class:`~diffusion.algorithms.ShardedEMA`, registered as ``ema``, makes that work when the model is
FSDP-sharded). It does nothing when no EMA runs or before ``ema_start``, when the average does not exist yet.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from composer.algorithms import EMA
from composer.core import State

__all__ = ['ema_weights', 'find_ema']


def find_ema(state: State) -> Optional[EMA]:
    """The run's EMA algorithm, if any."""
    return next((algorithm for algorithm in state.algorithms if isinstance(algorithm, EMA)), None)


@contextlib.contextmanager
def ema_weights(state: State, enabled: bool = True) -> Iterator[bool]:
    """Hold the EMA weights in ``state.model`` inside the block; yields whether they are the EMA weights."""
    ema = find_ema(state) if enabled else None
    if ema is None or not ema.ema_started or ema.ema_model is None:
        yield False
        return
    if ema.ema_weights_active:  # a checkpoint just swapped them in; the next batch swaps them out
        yield True
        return
    # Through the algorithm's own swap, which diffusion's ShardedEMA makes work under FSDP.
    ema._ensure_ema_weights_active(state)
    try:
        yield True
    finally:
        ema._ensure_training_weights_active(state)
