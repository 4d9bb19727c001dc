"""Count the samples the datasets replaced, log them, and stop a run whose data is mostly broken.

Builds on Composer's ``Callback`` (the ``after_dataloader`` and ``batch_end`` events) and the ``replaced`` flag that
:class:`~diffusion.data.faults.FaultTolerantStreamingDataset` puts in each sample: counting from the batches works
with DataLoader worker processes, whose own counters never reach the trainer. Counts are summed over ranks, so every
rank takes the same decision to stop, and they are checkpointed, so the fraction survives a resumption.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

__all__ = ['ReplacedSampleMonitor']

log = logging.getLogger(__name__)


class ReplacedSampleMonitor(Callback):
    """Log ``data/replaced_samples`` and ``data/replaced_fraction``; raise when the fraction passes a cap.

    The fraction is over every training sample seen so far, on all ranks. It is checked once ``min_samples`` were
    seen, so that a bad sample in the first batch does not stop the run; it is checked before the batch trains.

    Args:
        max_replaced_fraction (float): Largest fraction of replaced samples tolerated, in ``[0, 1]``. Default:
            ``0.01``.
        min_samples (int): Samples to see before the cap applies. Default: ``1000``.
        key (str): Batch key with the per-sample flags. Default: ``'replaced'``.
    """

    def __init__(self, max_replaced_fraction: float = 0.01, min_samples: int = 1000, key: str = 'replaced'):
        if not 0.0 <= max_replaced_fraction <= 1.0:
            raise ValueError(f'max_replaced_fraction must be in [0, 1], got {max_replaced_fraction}.')
        if min_samples < 0:
            raise ValueError(f'min_samples must be >= 0, got {min_samples}.')
        self.max_replaced_fraction = max_replaced_fraction
        self.min_samples = min_samples
        self.key = key
        self.replaced = 0
        self.seen = 0
        self._warned = False

    @property
    def replaced_fraction(self) -> float:
        return self.replaced / self.seen if self.seen else 0.0

    def after_dataloader(self, state: State, logger: Logger) -> None:
        batch = state.batch
        if not isinstance(batch, Mapping) or self.key not in batch:
            if not self._warned:
                log.warning('ReplacedSampleMonitor has no effect: the batches have no %r key.', self.key)
                self._warned = True
            return
        flags = torch.as_tensor(batch[self.key])
        replaced, seen = int((flags != 0).sum()), flags.numel()
        if dist.get_world_size() > 1:  # one process needs no collective on every step
            counts = state.device.tensor_to_device(torch.tensor([replaced, seen], dtype=torch.int64))
            dist.all_reduce(counts, reduce_operation='SUM')
            replaced, seen = counts.tolist()
        self.replaced += replaced
        self.seen += seen
        if self.seen >= self.min_samples and self.replaced_fraction > self.max_replaced_fraction:
            raise RuntimeError(
                f'{self.replaced} of the {self.seen} training samples so far ({self.replaced_fraction:.2%}) had to be '
                f'replaced, more than max_replaced_fraction={self.max_replaced_fraction}: the data is broken. The '
                'warnings of diffusion.data.faults name each replaced sample, its shard and why.'
            )

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.seen:
            logger.log_metrics(
                {'data/replaced_samples': self.replaced, 'data/replaced_fraction': self.replaced_fraction}
            )

    def state_dict(self) -> dict[str, Any]:
        return {'replaced': self.replaced, 'seen': self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.replaced = int(state['replaced'])
        self.seen = int(state['seen'])
