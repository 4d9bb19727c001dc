"""Dataset fingerprints: which data a run trained on, so that a resume on other data is noticed.

A dataset's fingerprint is one entry per stream: ``{'location', 'index_sha256', 'num_samples'}``, where
``location`` is where the stream is read from (its remote, or the local folder read in place), ``index_sha256`` the
SHA-256 of its MDS ``index.json`` and ``num_samples`` the samples that index lists. ``index.json`` names every
shard with its sample count, byte size and (for the shards this project writes) content hashes, so adding,
removing or rewriting a shard changes its digest, and the sample count says by how much in terms a person reads.

The datasets record their fingerprint in the resumption state Composer checkpoints and compare it on resume
(:class:`~diffusion.data.faults.FaultTolerantStreamingDataset`); a provenance report can record the same entries
for the data a model was trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, Optional

__all__ = ['STATE_KEY', 'fingerprint_index', 'fingerprint_local', 'fingerprint_mismatches', 'format_stream']

# The key of the fingerprint in a dataset's resumption state (``state_dict``), which Composer checkpoints.
STATE_KEY = 'data_fingerprint'


def fingerprint_index(location: str, index_json: bytes) -> dict[str, Any]:
    """The fingerprint of one stream from the bytes of its ``index.json``.

    Args:
        location (str): Where the stream is read from (a remote URL or a local folder), for messages.
        index_json (bytes): The stream's ``index.json`` as stored.

    Raises:
        ValueError: If ``index_json`` is not an MDS index (no ``shards`` list).
    """
    try:
        shards = json.loads(index_json)['shards']
        num_samples = sum(int(shard['samples']) for shard in shards)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f'{location}/index.json is not an MDS index: {error!r}') from error
    return {
        'location': location,
        'index_sha256': hashlib.sha256(index_json).hexdigest(),
        'num_samples': num_samples,
    }


def fingerprint_local(folder: str, location: Optional[str] = None) -> dict[str, Any]:
    """The fingerprint of the dataset whose ``index.json`` is in ``folder`` (a local copy or cache of it).

    Args:
        folder (str): The folder holding ``index.json``.
        location (str, optional): Where the data come from, when ``folder`` is a cache of a remote. Default:
            ``folder``.
    """
    with open(os.path.join(folder, 'index.json'), 'rb') as f:
        return fingerprint_index(location or folder, f.read())


def format_stream(entry: dict[str, Any]) -> str:
    """``'128 samples, index.json sha256 3f2a9c01d4e5'``: a stream's fingerprint as messages show it."""
    return f'{entry["num_samples"]} samples, index.json sha256 {str(entry["index_sha256"])[:12]}'


def fingerprint_mismatches(saved: Sequence[dict[str, Any]], current: Sequence[dict[str, Any]]) -> list[str]:
    """What differs between a saved fingerprint and the current one, one phrase per stream; empty when the same.

    Streams are compared in order, by digest and sample count; the location only names them, so the same data
    read from another folder or bucket match.
    """
    differences = []
    for position in range(max(len(saved), len(current))):
        before = saved[position] if position < len(saved) else None
        now = current[position] if position < len(current) else None
        if before is None:
            differences.append(f'stream {position} ({now["location"]}) is new: {format_stream(now)} now')
        elif now is None:
            differences.append(f'stream {position} ({before["location"]}) is gone: {format_stream(before)} saved')
        elif (before['index_sha256'], before['num_samples']) != (now['index_sha256'], now['num_samples']):
            differences.append(
                f'stream {position} ({now["location"]}): {format_stream(before)} saved vs {format_stream(now)} now'
            )
    return differences
