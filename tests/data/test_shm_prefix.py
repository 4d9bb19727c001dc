"""Jobs on one node that build streaming datasets at the same moment each get their own shared memory."""

from __future__ import annotations

import multiprocessing
import os
import re
import threading

import pytest
from streaming import MDSWriter, StreamingDataset

import diffusion.data  # noqa: F401  (installs the lock)
from diffusion.data import shm_prefix
from tests.conftest import master_port
from tests.data.shm_prefix_worker import build_in_a_job, build_together

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


def test_install_replaces_streamings_function_once():
    import streaming.base.dataset as streaming_dataset
    from streaming.base.shared import prefix

    shm_prefix.install()
    shm_prefix.install()
    assert streaming_dataset.get_shm_prefix is shm_prefix.agreed_shm_prefix
    assert shm_prefix.agreed_shm_prefix.__wrapped__ is prefix.get_shm_prefix


@pytest.mark.parametrize('agreed', [True, False])
def test_the_ranks_of_a_job_agree_on_the_prefix_when_another_job_registers_between_their_scans(tmp_path, agreed):
    """Rank 1's scan is made to find the number after its leader's, as when another job on the node registers one
    between the two scans: with streaming's own function rank 1 dies (its number "was not registered by local
    leader", or it "does not match"); with the installed one both ranks use the leader's number. The False case
    shows that the True case can fail."""
    root = str(tmp_path / 'data')
    _write(root)
    context = multiprocessing.get_context('spawn')
    with context.Pool(2) as pool:
        port = master_port()
        results = pool.starmap(build_in_a_job, [(rank, port, root, agreed) for rank in range(2)])
    if agreed:
        assert results[0] == results[1] and isinstance(results[0], int), results
    else:  # rank 1 looks for the next number: registered by nobody, or by the other job
        assert re.search('was not registered by local leader|registered does not match', str(results[1])), results
