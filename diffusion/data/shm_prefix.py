"""A node-wide lock around streaming's shared-memory prefix registration, so that jobs starting together do not collide.

Builds on ``streaming.base.shared.prefix.get_shm_prefix`` (mosaicml-streaming 0.13). Each ``StreamingDataset``
claims a number ``N`` for its shared memory (``/dev/shm/00000N_locals``, ``..._barrier``, ...): the node's local
leader scans for the first free number, then creates ``N_locals``. Two processes that are not ranks of one job (two
training runs on a node, a training run and a precompute job, two test workers) can both see ``N`` free, and the
second one to create it dies with ``FileExistsError: [Errno 17] File exists: '/00000N_locals'`` (streaming issues
#884 and #901, open). Here the leader holds an exclusive ``flock`` on one file per node from the scan until its
``N_locals`` exists, so the next leader's scan sees it.

The other ranks of a job keep streaming's unlocked scan: they must reach the barrier inside ``get_shm_prefix``
while their leader holds the lock. A second job's leader that registers in the instant between a rank's scan and
its own leader's can still make that rank choose another number; streaming then stops with its "shared memory
registered does not match" error rather than sharing memory. Only leader against leader, the collision seen in
practice, is prevented.

:func:`install` replaces the function where ``StreamingDataset`` looks it up; importing :mod:`diffusion.data` calls
it, so every dataset this project builds (and any ``StreamingDataset`` made in the same process) is covered.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import streaming.base.dataset as streaming_dataset

__all__ = ['LOCK_FILE', 'install', 'prefix_lock']

# /dev/shm is where the names being claimed live, so it is the one place every process that can collide shares.
LOCK_FILE = os.path.join(
    '/dev/shm' if os.path.isdir('/dev/shm') else tempfile.gettempdir(), 'diffusion_shm_prefix.lock'
)


@contextlib.contextmanager
def prefix_lock(path: str = LOCK_FILE) -> Iterator[None]:
    """Hold the node's exclusive lock on ``path``, creating the file if it is missing."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # made by another user: a read-only descriptor can hold an flock too
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def install() -> None:
    """Make ``StreamingDataset`` register its prefix under :func:`prefix_lock` (idempotent)."""
    original = streaming_dataset.get_shm_prefix
    if getattr(original, '_under_prefix_lock', False):
        return

    @functools.wraps(original)
    def get_shm_prefix(streams_local: list, streams_remote: list, world: Any, *args: Any, **kwargs: Any) -> Any:
        if not world.is_local_leader:
            return original(streams_local, streams_remote, world, *args, **kwargs)
        with prefix_lock():
            return original(streams_local, streams_remote, world, *args, **kwargs)

    get_shm_prefix._under_prefix_lock = True  # type: ignore[attr-defined]
    streaming_dataset.get_shm_prefix = get_shm_prefix
