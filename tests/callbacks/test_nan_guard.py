"""NaNGuard: non-finite losses, gradients and weights are caught, skipped or stopped on, and never checkpointed."""

import json
import logging
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch
from composer import Callback
from composer.callbacks import NaNMonitor

from diffusion.builders import build_trainer
from diffusion.callbacks import NaNGuard
from tests.callbacks.nan_guard_worker import InjectFault
from tests.conftest import REPO_ROOT, run_script, tiny_config

CLIPPING = '+algorithms.gradient_clipping={clipping_type:norm,clipping_threshold:1.0}'


def snapshot(state) -> dict[str, torch.Tensor]:
    """Copies of the trained parameters and of their optimizer state (exp_avg, exp_avg_sq, step)."""
    optimizer = state.optimizers[0]
    params = [p for group in optimizer.param_groups for p in group['params']]
    tensors = {f'{i}': p.detach().clone() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        tensors.update({f'{i}.{key}': value.clone() for key, value in optimizer.state.get(p, {}).items()})
    return tensors


class Snapshots(Callback):
    """``snapshot`` before and after each batch, by batch index."""

    def __init__(self):
        self.before, self.after = {}, {}

    def batch_start(self, state, logger):
        self.before[int(state.timestamp.batch)] = snapshot(state)

    def batch_end(self, state, logger):
        self.after[int(state.timestamp.batch) - 1] = snapshot(state)


def guarded_trainer(data, folder, callbacks, *overrides):
    """The tiny config at 2 samples a batch; ``callbacks`` go first, so that they act before the guard."""
    trainer = build_trainer(tiny_config(data, str(folder), 'train_dataloader.batch_size=2', *overrides))
    trainer.state.callbacks[:0] = callbacks
    return trainer


def guard_of(trainer) -> NaNGuard:
    return next(callback for callback in trainer.state.callbacks if isinstance(callback, NaNGuard))


def test_nan_monitor_lets_an_inf_loss_through():
    # The gap this callback fills: Composer's NaNMonitor looks for NaN only.
    NaNMonitor().after_loss(SimpleNamespace(loss=torch.tensor(math.inf)), None)
    with pytest.raises(RuntimeError, match='NaN'):
        NaNMonitor().after_loss(SimpleNamespace(loss=torch.tensor(math.nan)), None)


@pytest.mark.parametrize(
    'kind, fault, extra', [('inf_loss', 'loss', ()), ('nan_gradient', 'gradients', (CLIPPING,))], ids=['inf', 'nan']
)
def test_skip_leaves_weights_and_optimizer_state_bit_identical(kind, fault, extra, synthetic_dataset, tmp_path, caplog):
    snapshots = Snapshots()
    trainer = guarded_trainer(
        synthetic_dataset,
        tmp_path,
        [snapshots, InjectFault(kind, [2])],
        'max_duration=4ba',
        'save_folder=null',
        '+callbacks.nan_guard={mode:skip}',
        *extra,
    )
    with caplog.at_level(logging.WARNING, logger='diffusion.callbacks.nan_guard'):
        trainer.fit()
    trainer.close()
    assert int(trainer.state.timestamp.batch) == 4 and guard_of(trainer).skipped_batches == [2]
    before, after = snapshots.before[2], snapshots.after[2]
    assert before.keys() == after.keys() and {'0.exp_avg', '0.exp_avg_sq', '0.step'} <= before.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    for batch in (1, 3):  # the batches around it did train
        assert not torch.equal(snapshots.before[batch]['0'], snapshots.after[batch]['0'])
    assert float(snapshots.after[3]['0.step']) == 3  # 3 optimizer steps in 4 batches
    assert f'skipped the optimizer step: non-finite {fault} on rank 0 at batch 2 (epoch 0)' in caplog.text
    logged = re.findall(r'\[batch=\d+\]: nan_guard/skipped_steps: (\d+)', (tmp_path / 'log.txt').read_text())
    assert logged == ['0', '0', '1', '1']


def test_stop_raises_naming_the_batch_and_the_parameter_before_the_step(synthetic_dataset, tmp_path):
    snapshots = Snapshots()
    trainer = guarded_trainer(
        synthetic_dataset,
        tmp_path,
        [snapshots, InjectFault('nan_gradient', [1])],
        'max_duration=3ba',
        'save_folder=null',
        '+callbacks.nan_guard={}',  # 'stop' is the default
    )
    message = (
        r'^NaNGuard: non-finite gradients on rank 0 at batch 1 \(epoch 0\); on rank 0 the gradient of 1 of \d+ '
        r'parameters: unet\.conv_in\.weight\. Stopped before the optimizer step of this batch\.$'
    )
    with pytest.raises(RuntimeError, match=message):
        trainer.fit()
    now = snapshot(trainer.state)
    for key, value in snapshots.before[1].items():
        assert torch.equal(now[key], value), key


@pytest.mark.parametrize(
    'limits, faults, reason',
    [
        ('max_consecutive_skips:1', [0, 1], 'max_consecutive_skips=1'),
        # Batch 1 is clean, so the two skips are not consecutive: only the total trips.
        ('max_skips:1,max_consecutive_skips:1', [0, 2], 'max_skips=1'),
    ],
    ids=['consecutive', 'total'],
)
def test_too_many_skips_stop_the_run(limits, faults, reason, synthetic_dataset, tmp_path):
    trainer = guarded_trainer(
        synthetic_dataset,
        tmp_path,
        [InjectFault('inf_loss', faults)],
        'max_duration=4ba',
        'save_folder=null',
        f'+callbacks.nan_guard={{mode:skip,{limits}}}',
    )
    message = rf'at batch {faults[1]} .*\. 2 steps skipped, more than {reason}; stopping\. Skipped batches: \[0, '
    with pytest.raises(RuntimeError, match=message):
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == faults[1]


def read_checkpoints(folder):
    """The checkpoint files in ``folder`` and the UNet weights of the one ``latest-rank0.pt`` points to."""
    names = sorted(name for name in os.listdir(folder) if name.endswith('.pt'))  # not sidecar files
    latest = os.path.realpath(os.path.join(folder, 'latest-rank0.pt'))
    model = torch.load(latest, map_location='cpu', weights_only=False)['state']['model']  # our own file
    return names, os.path.basename(latest), {k: v for k, v in model.items() if k.startswith('unet.')}


def test_a_diverging_learning_rate_stops_before_a_nan_checkpoint(synthetic_dataset, tmp_path):
    trainer = guarded_trainer(
        synthetic_dataset,
        tmp_path,
        [],
        'max_duration=6ba',
        'optimizer.lr=1e6',
        'save_interval=1ba',
        '+callbacks.nan_guard={}',
    )
    with pytest.raises(RuntimeError, match=r'non-finite (loss|gradients).* at batch (\d+) ') as error:
        trainer.fit()
    bad = int(re.search(r'at batch (\d+) ', str(error.value)).group(1))
    assert 1 <= bad < 6
    names, latest, unet = read_checkpoints(tmp_path / 'checkpoints')
    assert names == sorted([f'ep0-ba{b}-rank0.pt' for b in range(1, bad + 1)] + ['latest-rank0.pt'])
    assert latest == f'ep0-ba{bad}-rank0.pt' and len(unet) > 50
    assert all(bool(torch.isfinite(value).all()) for value in unet.values())
    assert max(float(value.abs().max()) for value in unet.values()) > 1e3  # the learning rate did act


def test_weights_that_overflow_in_a_step_stop_even_in_skip_mode_before_the_checkpoint(synthetic_dataset, tmp_path):
    trainer = guarded_trainer(
        synthetic_dataset,
        tmp_path,
        [InjectFault('inf_lr', [2])],
        'max_duration=4ba',
        'save_interval=1ba',
        '+callbacks.nan_guard={mode:skip}',
    )
    message = (
        r'^NaNGuard: the optimizer step of batch 2 left non-finite weights on rank 0; on rank 0 the weight of \d+ of '
        r'\d+ parameters: unet\.conv_in\.weight, .*Stopped before this batch is checkpointed or evaluated'
    )
    with pytest.raises(RuntimeError, match=message):
        trainer.fit()
    names, latest, unet = read_checkpoints(tmp_path / 'checkpoints')
    assert names == ['ep0-ba1-rank0.pt', 'ep0-ba2-rank0.pt', 'latest-rank0.pt'] and latest == 'ep0-ba2-rank0.pt'
    assert all(bool(torch.isfinite(value).all()) for value in unet.values())


def test_arguments_are_checked_and_the_skip_count_is_checkpointed():
    with pytest.raises(ValueError, match="mode must be one of skip, stop; got 'ignore'"):
        NaNGuard(mode='ignore')
    with pytest.raises(ValueError, match='max_skips must be None or >= 0; got -1'):
        NaNGuard(max_skips=-1)
    guard = NaNGuard(mode='skip')
    guard.skipped_batches, guard.consecutive_skips = [3, 7], 1
    resumed = NaNGuard(mode='skip')
    resumed.load_state_dict(guard.state_dict())
    assert (resumed.skipped_steps, resumed.skipped_batches, resumed.consecutive_skips) == (2, [3, 7], 1)
    with pytest.warns(UserWarning, match='remove nan_monitor'):
        guard.fit_start(SimpleNamespace(callbacks=[NaNMonitor(), guard]), None)


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_both_ranks_skip_the_batches_whose_fault_only_rank_1_saw(synthetic_dataset, tmp_path):
    # Rank 1 gets an inf loss at batch 1 and a NaN gradient after DDP's all-reduce at batch 3; rank 0 sees neither.
    run_script(
        os.path.join(REPO_ROOT, 'tests', 'callbacks', 'nan_guard_worker.py'),
        synthetic_dataset,
        str(tmp_path),
        'max_duration=4ba',
        'train_dataloader.batch_size=4',
        'save_folder=null',
        '+callbacks.nan_guard={mode:skip}',
        processes=2,
    )
    rank0, rank1 = (json.loads((tmp_path / f'nan_guard_rank{rank}.json').read_text()) for rank in (0, 1))
    assert rank0['skipped_batches'] == rank1['skipped_batches'] == [1, 3]
    assert rank0['batch'] == rank1['batch'] == 4
    assert rank0['unet'] == rank1['unet']  # the replicas still agree: no rank stepped alone
