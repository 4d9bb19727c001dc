"""Worker of tests/data/test_shm_prefix.py: builds streaming datasets in a fresh process, with or without the lock.

Imports only streaming at the top, so that a process run with ``locked=False`` has streaming's own registration.
"""

from __future__ import annotations

import os

from streaming import StreamingDataset


def build_together(roots: list[str], barrier, locked: bool) -> tuple[int, str]:
    """Build a dataset over each root as soon as every process reaches ``barrier``; returns (collisions, last error)."""
    if locked:
        import diffusion.data  # noqa: F401  (installs the lock)
    collisions, last = 0, ''
    for root in roots:
        barrier.wait()
        try:
            StreamingDataset(local=root, batch_size=1)
        except FileExistsError as error:
            collisions, last = collisions + 1, str(error)
    return collisions, last


def build_in_a_job(rank: int, port: int, root: str, agreed: bool):
    """Rank ``rank`` of a 2-rank gloo job on one node builds a dataset over ``root``; rank 1's own prefix scan
    answers one more than the first free number. Returns the dataset's prefix, or the error raised."""
    import torch.distributed as dist
    from streaming.base.shared import prefix

    if agreed:
        import diffusion.data  # noqa: F401  (installs the agreed prefix)
    os.environ.update(RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE='2')
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    if rank == 1:
        scan = prefix._check_and_find
        prefix._check_and_find = lambda *args, **kwargs: scan(*args, **kwargs) + 1
    try:
        return StreamingDataset(local=root, batch_size=1)._shm_prefix_int
    except RuntimeError as error:
        return error
    finally:
        dist.destroy_process_group()
