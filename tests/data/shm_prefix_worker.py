"""Worker of tests/data/test_shm_prefix.py: builds streaming datasets in a fresh process, with or without the lock.

Imports only streaming at the top, so that a process run with ``locked=False`` has streaming's own registration.
"""

from __future__ import annotations

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
