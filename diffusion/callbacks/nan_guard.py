"""Catch NaN and inf in the loss, the gradients and the weights, then skip the step or stop, alike on every rank.

Composer's :class:`~composer.callbacks.NaNMonitor` raises on a NaN loss, but it lets an inf loss through, never
looks at the gradients, and raises on the one rank that saw the NaN while the others wait in the next collective
until the timeout. Outside fp16 nothing skips a bad step either (only fp16's GradScaler does), so under fp32 or bf16
one bad batch writes NaN into the weights and the optimizer moments, and the next checkpoint saves them over the last
good one. :class:`NaNGuard` is NaNMonitor extended to cover these cases: it decides on flags all-reduced over the
ranks, skips the optimizer step for real or stops naming the batch, and stops before a checkpoint of non-finite
weights is written.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Optional, Sequence

import torch
from composer import Logger, State
from composer.callbacks import NaNMonitor
from composer.core import Precision
from composer.utils import dist
from torch.distributed.tensor import DTensor
from torch.nn.utils import get_total_norm

__all__ = ['NaNGuard']

log = logging.getLogger(__name__)

MODES = ('skip', 'stop')


class NaNGuard(NaNMonitor):
    """Skip or stop on a non-finite loss, gradient or weight, taking the same decision on every rank.

    It works at three events of the training loop:

    * ``AFTER_LOSS``, every microbatch: notes whether the loss is finite, without a host sync.
    * ``AFTER_TRAIN_BATCH``, once per batch: after the backward of the last microbatch and after the algorithms of
      this event (gradient clipping), but before the optimizer update, which Composer runs after this event, with or
      without a closure. It checks the gradients the optimizer is about to apply, all-reduces the flags of every rank
      and decides. Skipping sets every gradient to ``None``: torch optimizers leave a parameter without a gradient
      untouched (no update, no weight decay, no moment update, no step count), so the weights and the optimizer
      state stay bit-identical.
    * ``BATCH_END``: checks the updated weights, because a step with finite gradients can still overflow them (a
      diverging learning rate, low-precision weights). Non-finite weights stop the run in either mode, before the
      evaluators and Composer's checkpoint saver run for this batch, so the last checkpoint stays the last good one.

    A skipped batch still counts as trained: the timestamp, and with it the learning-rate schedule, moves on, and
    its samples are not seen again. Batches are named by their index in the run (``state.timestamp.batch``, as in the
    sample ledger). Under ``amp_fp16``, non-finite gradients are left to the GradScaler (it skips the step and lowers
    the loss scale); the loss and the weights are still checked. Norm-based gradient clipping spreads one non-finite
    gradient to every gradient, which is still caught but then names every parameter.

    The default mode is ``'stop'``, NaNMonitor's behaviour: skipping drops batches from training, so it is opted
    into. Do not also list ``nan_monitor``: it would raise on one rank before this callback decides.

    Cost per batch: one fused max-abs pass over the gradients and one over the trained weights, two all-reduces of
    a few flags per rank, and two host syncs.

    Example:
        .. code-block:: yaml

            callbacks:
              nan_guard: {mode: skip, max_consecutive_skips: 5}
            algorithms:
              gradient_clipping: {clipping_type: norm, clipping_threshold: 1.0}

    Args:
        mode (str, optional): What to do when the loss or the gradients of a batch are non-finite on any rank:
            ``'skip'`` its optimizer step (counted in the ``nan_guard/skipped_steps`` metric, with a warning naming
            the batch) or ``'stop'`` the run with a ``RuntimeError`` naming the batch and what was non-finite.
            Default: ``'stop'``.
        max_skips (int, optional): In ``'skip'`` mode, stop once more than this many steps were skipped in total.
            ``None`` for no limit. Default: ``None``.
        max_consecutive_skips (int, optional): In ``'skip'`` mode, stop once more than this many steps in a row were
            skipped: a diverged model fails every batch, and skipping forever would only burn compute. ``None`` for no
            limit. Default: ``10``.
    """

    def __init__(self, mode: str = 'stop', max_skips: Optional[int] = None, max_consecutive_skips: Optional[int] = 10):
        if mode not in MODES:
            raise ValueError(f'NaNGuard mode must be one of {", ".join(MODES)}; got {mode!r}.')
        for name, value in (('max_skips', max_skips), ('max_consecutive_skips', max_consecutive_skips)):
            if value is not None and value < 0:
                raise ValueError(f'NaNGuard {name} must be None or >= 0; got {value}.')
        self.mode = mode
        self.max_skips = max_skips
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_batches: list[int] = []
        self.consecutive_skips = 0
        self._loss_is_finite: Optional[torch.Tensor] = None

    @property
    def skipped_steps(self) -> int:
        """How many optimizer steps were skipped in this run, resumptions included."""
        return len(self.skipped_batches)

    def fit_start(self, state: State, logger: Logger) -> None:
        if any(type(callback) is NaNMonitor for callback in state.callbacks):
            warnings.warn(
                'nan_monitor raises on a NaN loss on its own rank before nan_guard decides for all ranks, so '
                'nan_guard cannot skip that step; remove nan_monitor (nan_guard checks everything it checks).',
                stacklevel=2,
            )

    def before_train_batch(self, state: State, logger: Logger) -> None:
        # Also reached again when automicrobatching retries a batch after an OOM: start its flags afresh.
        self._loss_is_finite = None

    def after_loss(self, state: State, logger: Logger) -> None:
        # Note the flag and decide at the end of the batch: raising here, as NaNMonitor does, would leave the other
        # ranks waiting in the next collective, and reading the flag now would sync the host every microbatch.
        finite = torch.stack([torch.isfinite(loss).all() for loss in _loss_tensors(state.loss)]).all()
        self._loss_is_finite = finite if self._loss_is_finite is None else self._loss_is_finite & finite

    def after_train_batch(self, state: State, logger: Logger) -> None:
        parameters = _trained_parameters(state)
        loss_ok = self._loss_is_finite if self._loss_is_finite is not None else torch.tensor(True)
        grads = [] if state.precision == Precision.AMP_FP16 else [p.grad for p in parameters if p.grad is not None]
        faults = _faults_on_any_rank(state, {'loss': ~loss_ok, 'gradients': ~_all_finite(grads)})
        self._loss_is_finite = None
        if not faults:
            self.consecutive_skips = 0
            return

        batch = int(state.timestamp.batch)
        what = f'{_describe(faults)} at batch {batch} (epoch {int(state.timestamp.epoch)})'
        if 'gradients' in faults and dist.get_global_rank() in faults['gradients']:
            with_grad = [p for p in parameters if p.grad is not None]
            what += f'; {_name_non_finite(state, with_grad, [p.grad for p in with_grad], "gradient")}'
        if self.mode == 'stop':
            raise RuntimeError(f'NaNGuard: {what}. Stopped before the optimizer step of this batch.')

        for optimizer in state.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.skipped_batches.append(batch)
        self.consecutive_skips += 1
        log.warning('NaNGuard skipped the optimizer step: %s (%d skipped so far).', what, self.skipped_steps)
        for limit, count, name in (
            (self.max_skips, self.skipped_steps, 'max_skips'),
            (self.max_consecutive_skips, self.consecutive_skips, 'max_consecutive_skips'),
        ):
            if limit is not None and count > limit:
                raise RuntimeError(
                    f'NaNGuard: {what}. {count} steps skipped, more than {name}={limit}; stopping. '
                    f'Skipped batches: {self.skipped_batches}.'
                )

    def batch_end(self, state: State, logger: Logger) -> None:
        logger.log_metrics({'nan_guard/skipped_steps': self.skipped_steps})
        parameters = _trained_parameters(state)
        faults = _faults_on_any_rank(state, {'weights': ~_all_finite([p.detach() for p in parameters])})
        if faults:
            batch = int(state.timestamp.batch) - 1  # the timestamp already counts the batch that just finished
            what = f'the optimizer step of batch {batch} left {_describe(faults)}'
            if dist.get_global_rank() in faults['weights']:
                what += f'; {_name_non_finite(state, parameters, [p.detach() for p in parameters], "weight")}'
            raise RuntimeError(
                f'NaNGuard: {what}. Stopped before this batch is checkpointed or evaluated: the last checkpoint is '
                'the last good one. Lower the learning rate.'
            )

    def state_dict(self) -> dict:
        return {'skipped_batches': list(self.skipped_batches), 'consecutive_skips': self.consecutive_skips}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_batches = list(state['skipped_batches'])
        self.consecutive_skips = state['consecutive_skips']


def _loss_tensors(loss) -> list[torch.Tensor]:
    """The tensors of a loss in any form Composer accepts, as NaNMonitor reads them."""
    if isinstance(loss, torch.Tensor):
        return [loss]
    if isinstance(loss, dict):
        return list(loss.values())
    if isinstance(loss, Sequence):
        return list(loss)
    raise TypeError(f'Loss is of type {type(loss)}, but should be a tensor, a sequence or a dict of tensors.')


def _trained_parameters(state: State) -> list[torch.Tensor]:
    # The optimizers' parameters are exactly what a step changes: the frozen VAE and text encoder are left out.
    return [p for optimizer in state.optimizers for group in optimizer.param_groups for p in group['params']]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters and gradients are DTensors: check this rank's shard (the all-reduce combines the shards)
    # rather than letting DTensor's own reduction start collectives that not every rank would join.
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A bool tensor on the tensors' device, true when every element of every tensor is finite."""
    # FSDP shards can be empty, and the inf-norm of an empty tensor is an error.
    tensors = [t for t in map(_local, tensors) if t.numel() > 0]
    if not tensors:
        return torch.tensor(True)
    # The max-abs (inf) norm is finite exactly when every element is, cannot overflow, and is one fused pass.
    return torch.isfinite(get_total_norm(tensors, norm_type=math.inf))


def _faults_on_any_rank(state: State, local: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """For each kind of fault flagged on some rank, the ranks that flagged it: the same answer on every rank."""
    world_size, rank = dist.get_world_size(), dist.get_global_rank()
    # One row per rank, so that the message can say where the fault was; MAX keeps every rank's own row.
    flags = state.device.tensor_to_device(torch.zeros(world_size, len(local)))
    flags[rank] = torch.stack([flag.to(flags.device, torch.float32).reshape(()) for flag in local.values()])
    dist.all_reduce(flags, reduce_operation='MAX')
    by_kind = flags.t().tolist()
    return {kind: [r for r in range(world_size) if row[r]] for kind, row in zip(local, by_kind) if any(row)}


def _describe(faults: dict[str, list[int]]) -> str:
    """E.g. ``non-finite loss on rank 1, non-finite gradients on ranks 0, 1``."""
    parts = []
    for kind, ranks in faults.items():
        where = f'rank {ranks[0]}' if len(ranks) == 1 else f'ranks {", ".join(map(str, ranks))}'
        parts.append(f'non-finite {kind} on {where}')
    return ', '.join(parts)


def _name_non_finite(
    state: State, parameters: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], what: str, shown: int = 3
) -> str:
    """Which ``parameters`` of this rank have a non-finite ``tensors`` (their gradients or weights); a slow path."""
    names = {id(p): name for name, p in state.model.named_parameters()}
    bad = [names.get(id(p), '<unnamed>') for p, t in zip(parameters, tensors) if not torch.isfinite(_local(t)).all()]
    listed = ', '.join(bad[:shown]) + (', ...' if len(bad) > shown else '')
    return f'on rank {dist.get_global_rank()} the {what} of {len(bad)} of {len(parameters)} parameters: {listed}'
