"""Jobs on one node that build streaming datasets at the same moment each get their own shared memory."""

from __future__ import annotations

import multiprocessing
import os
import threading

import pytest
from streaming import MDSWriter, StreamingDataset

import diffusion.data  # noqa: F401  (installs the lock)
from diffusion.data import shm_prefix
from tests.data.shm_prefix_worker import build_together

PROCESSES = 4
DATASETS_PER_PROCESS = 4


def _write(root: str) -> None:
    with MDSWriter(out=root, columns={'x': 'int'}) as writer:
        for value in range(4):
            writer.write({'x': value})


def _start_together(tmp_path, locked: bool) -> list[tuple[int, str]]:
    roots = [[str(tmp_path / f'p{p}_d{d}') for d in range(DATASETS_PER_PROCESS)] for p in range(PROCESSES)]
    for root in sum(roots, []):
        _write(root)
    # spawn: fresh interpreters, where StreamingDataset has the lock only if build_together installs it.
    context = multiprocessing.get_context('spawn')
    with context.Manager() as manager, context.Pool(PROCESSES) as pool:
        barrier = manager.Barrier(PROCESSES)
        return pool.starmap(build_together, [(r, barrier, locked) for r in roots])


def test_datasets_built_at_the_same_moment_in_separate_processes_do_not_collide(tmp_path):
    results = _start_together(tmp_path, locked=True)
    assert [collisions for collisions, _ in results] == [0] * PROCESSES, results


def test_without_the_lock_the_same_start_collides(tmp_path):
    """The test above can fail: streaming alone gives two of these processes the same prefix."""
    # Holding the lock keeps every other locked job on the node (the other test worker) out of this race.
    with shm_prefix.prefix_lock():
        results = _start_together(tmp_path, locked=False)
    collisions = sum(c for c, _ in results)
    if collisions == 0:
        pytest.skip('the unlocked processes happened not to overlap this time')
    assert any('_locals' in error for _, error in results if error), results


def test_a_dataset_waits_for_the_lock_before_claiming_its_prefix(tmp_path):
    root = str(tmp_path / 'data')
    _write(root)
    built = threading.Event()

    def build():
        StreamingDataset(local=root, batch_size=1)
        built.set()

    with shm_prefix.prefix_lock():
        thread = threading.Thread(target=build)
        thread.start()
        assert not built.wait(1.0), 'the dataset claimed its prefix while another process held the lock'
    assert built.wait(30.0)
    thread.join()
    assert os.path.exists(shm_prefix.LOCK_FILE)


def test_install_wraps_once():
    shm_prefix.install()
    shm_prefix.install()
    import streaming.base.dataset as streaming_dataset

    wrapped = streaming_dataset.get_shm_prefix
    assert wrapped._under_prefix_lock
    assert not getattr(wrapped.__wrapped__, '_under_prefix_lock', False)
