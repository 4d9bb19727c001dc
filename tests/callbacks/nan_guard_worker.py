"""Fault injection for tests/callbacks/test_nan_guard.py, and its two-rank worker (run under ``composer -n 2``).

``InjectFault`` is a test-only callback that makes the loss inf, one gradient element NaN, or the learning rate infinite
at chosen batches, optionally on chosen ranks only. Run as a script, this module trains the tiny config under
NaNGuard with faults on rank 1 only and writes what each rank decided to ``<run_folder>/nan_guard_rank<r>.json``.
"""

import hashlib
import json
import math
import os
import sys
from typing import Optional, Sequence

from composer import Callback, Logger, State
from composer.utils import dist

KINDS = ('inf_loss', 'nan_gradient', 'inf_lr')


class InjectFault(Callback):
    """Inject a numeric fault at ``batches`` (run indices) on ``ranks`` (all when ``None``).

    Must come before NaNGuard in ``state.callbacks`` so that the guard sees the fault at the same event.
    """

    def __init__(
        self,
        kind: str,
        batches: Sequence[int],
        ranks: Optional[Sequence[int]] = None,
        parameter: str = 'unet.conv_in.weight',
    ):
        assert kind in KINDS, kind
        self.kind, self.batches, self.ranks, self.parameter = kind, set(batches), ranks, parameter

    def _now(self, state: State, kind: str) -> bool:
        rank_ok = self.ranks is None or dist.get_global_rank() in self.ranks
        return self.kind == kind and rank_ok and int(state.timestamp.batch) in self.batches

    def batch_start(self, state: State, logger: Logger) -> None:
        if self._now(state, 'inf_lr'):
            # The update overflows the weights although the loss and the gradients are finite. (A finite rate past
            # float32's range is refused by AdamW before it gets that far.)
            for group in state.optimizers[0].param_groups:
                group['lr'] = math.inf

    def after_loss(self, state: State, logger: Logger) -> None:
        if self._now(state, 'inf_loss'):
            # Adding a constant leaves every gradient finite: only a check of the loss itself sees this fault.
            state.loss = state.loss + math.inf

    def after_backward(self, state: State, logger: Logger) -> None:
        if self._now(state, 'nan_gradient'):
            # After the backward, hence after DDP's all-reduce: the NaN stays on this rank, like a fault in one
            # rank's FSDP shard. One element of one parameter: everything else is finite.
            grad = next(p.grad for name, p in state.model.named_parameters() if name.endswith(self.parameter))
            grad.view(-1)[0] = math.nan


def main() -> None:
    from diffusion.builders import build_trainer
    from tests.conftest import tiny_config

    data, run_folder, *overrides = sys.argv[1:]
    trainer = build_trainer(tiny_config(data, run_folder, *overrides))
    # Faults on rank 1 only, both invisible to rank 0: a loss only rank 1 computes, a gradient after the all-reduce.
    trainer.state.callbacks[:0] = [InjectFault('inf_loss', [1], ranks=[1]), InjectFault('nan_gradient', [3], ranks=[1])]
    trainer.fit()
    guard = next(callback for callback in trainer.state.callbacks if type(callback).__name__ == 'NaNGuard')
    unet = trainer.state.model.module.unet if hasattr(trainer.state.model, 'module') else trainer.state.model.unet
    digest = hashlib.sha256(b''.join(p.detach().numpy().tobytes() for p in unet.parameters())).hexdigest()
    result = {'skipped_batches': guard.skipped_batches, 'batch': int(trainer.state.timestamp.batch), 'unet': digest}
    with open(os.path.join(run_folder, f'nan_guard_rank{dist.get_global_rank()}.json'), 'w') as f:
        json.dump(result, f)


if __name__ == '__main__':
    main()
