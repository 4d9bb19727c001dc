"""A per-rank ledger of which samples every batch trained on.

Builds on Composer's ``Callback`` (the ``after_dataloader`` event) and the ``sample_index`` that
:class:`diffusion.data.StreamingImageCaptionDataset` puts in each batch. One JSON line per batch per rank,
flushed as written: an audit trail of the training data for provenance, and the evidence that ranks see disjoint
samples and that a resumed run continues the data order where it stopped.
"""

from __future__ import annotations

import json
import os

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

__all__ = ['SampleLedger']


class SampleLedger(Callback):
    """Append ``{"batch": N, "epoch": E, "samples": [...]}`` to ``<folder>/rank<R>.jsonl`` for every batch.

    Args:
        folder (str): Folder of the per-rank ledgers. Default: ``'ledger'``.
        key (str): Batch key with the sample identifiers. Default: ``'sample_index'``.
    """

    def __init__(self, folder: str = 'ledger', key: str = 'sample_index'):
        self.folder = folder
        self.key = key
        self._file = None

    def fit_start(self, state: State, logger: Logger) -> None:
        os.makedirs(self.folder, exist_ok=True)
        self._file = open(os.path.join(self.folder, f'rank{dist.get_global_rank()}.jsonl'), 'a')

    def after_dataloader(self, state: State, logger: Logger) -> None:
        if self.key not in state.batch:
            raise KeyError(f'SampleLedger: the batch has no {self.key!r}; it has {sorted(state.batch)}.')
        samples = [int(i) for i in state.batch[self.key]]
        record = {'batch': int(state.timestamp.batch), 'epoch': int(state.timestamp.epoch), 'samples': samples}
        self._file.write(json.dumps(record) + '\n')
        self._file.flush()

    def close(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
