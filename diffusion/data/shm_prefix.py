"""Streaming's shared-memory prefix, claimed without collisions and agreed by every rank of a job.

Builds on ``streaming.base.shared.prefix.get_shm_prefix`` (mosaicml-streaming 0.13). Each ``StreamingDataset``
claims a number ``N`` for its shared memory (``/dev/shm/00000N_locals``, ``..._barrier``, ...). In streaming, every
rank of a node scans for the first free number on its own; then the local leader creates ``N_locals`` and the other
ranks check that they found the same ``N``. Two jobs on one node (two training runs, a training run and a precompute
job, two test workers) break this in two ways:

- both leaders see ``N`` free, and the second to create it dies with ``FileExistsError: [Errno 17] File exists:
  '/00000N_locals'`` (streaming issues #884 and #901, open);
- another job registers ``N`` between the leader's scan and another rank's, that rank finds ``N+1`` and dies with
  "shared memory registered does not match local leader", while the leader waits at a barrier until the peer's
  connection closes (seen as ``Rank 1 crashed with exit code 1`` and a gloo "Connection closed by peer").

Here only the local leader scans, holding an exclusive ``flock`` on one file per node from the scan until its
``N_locals`` exists (so the next leader's scan sees it), and creating it exclusively (a job that does not take the
lock and won the number makes it scan again). The other ranks take their leader's ``N`` from an
``all_gather_object`` instead of a scan of their own, and check its registered local directories as streaming does.

:func:`install` replaces the function where ``StreamingDataset`` looks it up; importing :mod:`diffusion.data` calls
it, so every dataset this project builds (and any ``StreamingDataset`` made in the same process) is covered.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from typing import Any, Optional, Union

import streaming.base.dataset as streaming_dataset
from streaming.base.constant import LOCALS, SHM_TO_CLEAN
from streaming.base.shared import SharedMemory
from streaming.base.shared.prefix import _check_and_find_retrying, _check_self, _get_path, _pack_locals, _unpack_locals
from torch import distributed as dist

__all__ = ['LOCK_FILE', 'agreed_shm_prefix', 'install', 'prefix_lock']

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


# A bound on the leader's rescans, each caused by a job outside the lock creating the number it had found free.
MAX_REGISTRATION_TRIES = 100


def _register(streams_local: list[str], streams_remote: list[Union[str, None]], retry: int) -> tuple[int, Any]:
    """Under the node's lock, scan for the first free number and create its locals block exclusively."""
    with prefix_lock():
        for _ in range(MAX_REGISTRATION_TRIES):
            prefix_int = max(
                _check_and_find_retrying(streams_local, streams_remote, shm_name=name, retry=retry)
                for name in SHM_TO_CLEAN
            )
            data = _pack_locals(streams_local, prefix_int)
            try:
                shm = SharedMemory(_get_path(prefix_int, LOCALS), True, len(data))
            except FileExistsError:
                continue  # created since the scan by a job outside the lock: the next scan passes it
            shm.buf[: len(data)] = data
            return prefix_int, shm
    raise RuntimeError(
        f'No streaming shared-memory prefix could be registered for {streams_local} in {MAX_REGISTRATION_TRIES} '
        'tries: other jobs on this node created each free one first.'
    )


def _leader_prefix(node: int, prefix_int: Optional[int]) -> int:
    """Every rank's copy of its node leader's number (the leader passes its own, the other ranks ``None``)."""
    if not (dist.is_available() and dist.is_initialized()):
        if prefix_int is None:
            raise RuntimeError("A rank that is not its node's local leader needs torch.distributed to be initialized.")
        return prefix_int
    entries: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(entries, (node, prefix_int))
    (leader,) = [prefix for where, prefix in entries if where == node and prefix is not None]
    return leader


def agreed_shm_prefix(
    streams_local: list[str], streams_remote: list[Union[str, None]], world: Any, retry: int = 100
) -> tuple[int, Any]:
    """Drop-in for streaming's ``get_shm_prefix``: ``(N, the N_locals block)``, the same ``N`` on every rank of a
    node, claimed as the module docstring says."""
    _check_self(streams_local)
    registered = _register(streams_local, streams_remote, retry) if world.is_local_leader else None
    prefix_int = _leader_prefix(world.node, registered[0] if registered else None)
    if registered is not None:
        return registered
    shm = SharedMemory(_get_path(prefix_int, LOCALS), False)
    their_locals, their_prefix_int = _unpack_locals(bytes(shm.buf))
    if their_locals != streams_local or their_prefix_int != prefix_int:
        raise RuntimeError(
            f"The streaming shared memory {_get_path(prefix_int, LOCALS)} of this node's leader holds the local "
            f'directories {their_locals}, this rank has {streams_local}: every rank must give a dataset the same '
            '`local`.'
        )
    return prefix_int, shm


def install() -> None:
    """Make ``StreamingDataset`` claim its prefix with :func:`agreed_shm_prefix` (idempotent)."""
    original = streaming_dataset.get_shm_prefix
    if original is agreed_shm_prefix:
        return
    agreed_shm_prefix.__wrapped__ = original  # type: ignore[attr-defined]
    streaming_dataset.get_shm_prefix = agreed_shm_prefix
