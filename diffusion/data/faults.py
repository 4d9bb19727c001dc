"""Data faults while training: checked shards, clear shard errors, and unusable samples replaced, not fatal.

Builds on ``streaming.StreamingDataset`` (mosaicml-streaming 0.13), changing three of its behaviours:

* Shards are checked. ``validate_hash`` is on by default, and the shard files already on local disk, which streaming
  never checks, are verified at start-up (:mod:`diffusion.data.shard_integrity`).
* A shard that cannot be fetched fails with its name. Streaming downloads in a background thread whose exception
  only sets a flag: the epoch then ends early *without an error* (none of its samples at all when the first shard
  is missing), and the next epoch raises "Background thread failed. Check other traceback." Here the iterator raises
  :class:`ShardDownloadError` naming the shard, the remote and the attempts made. With DataLoader workers,
  streaming's thread that waits for a shard another worker is downloading waits forever when that download fails;
  here it tries the shard itself and fails with the same error.
* A sample that cannot train (an image that does not decode, an empty caption, text that is not UTF-8, ...) is
  replaced by the next usable one (index + 1, wrapping; streaming itself has no skip). The choice depends on the
  data alone, so it is the same on every rank, worker, run and resumption, and batches keep their size. Each
  replacement is logged with the sample's index, shard and source, and the sample dict says ``replaced = 1``, so that
  :class:`~diffusion.data.replaced_sample_monitor.ReplacedSampleMonitor` counts replacements from the batches:
  DataLoader workers are separate processes, so a counter kept in the dataset would never reach the trainer.

It records which data it reads: its resumption state (``state_dict``, which Composer checkpoints) carries the
dataset's fingerprint (:mod:`diffusion.data.fingerprint`: per stream, the SHA-256 of ``index.json`` and the sample
count), and ``load_state_dict`` refuses a checkpoint taken on other data, naming the stream and both values, unless
``allow_changed_data`` is set. Streaming alone resumes on added or removed shards without a word.

A local dataset read in place skips streaming's per-sample bookkeeping threads. Each epoch, streaming starts a
"prepare" thread (download each sample's shard) and a "ready" thread (wait until it is local) that walk the samples
a few at a time behind the training loop, taking a file lock and checking files per sample. When every shard is
already local, uncompressed and cannot be evicted (no ``cache_limit``), they have nothing to do, yet on a small
machine their per-sample work contends with the loop's own for the interpreter: on a 2-core VM, reading a whole
epoch in batches of 16 took 37.2 ms a batch with them and 16.5 ms without (32 px images; precomputed latents 22.3
and 7.8 ms). There they mark the epoch's samples ready at once and exit; a shard file that disappears later still
fails in ``get_item``, naming the shard.

It also guards the license subset a run may train on: with ``license_preset`` (``'commercial'`` for the -C models),
every sample's ``license`` column is checked against the pipeline's preset when it is read, and a sample outside
it stops the run with an error naming the sample, its shard and its license (a wrong data path for a commercial
model is a legal problem, not a data fault to skip).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, Optional

from composer.utils import dist
from streaming import StreamingDataset
from streaming.base.constant import TICK
from streaming.base.dataset import _ShardState
from streaming.base.format.base.reader import Reader

from diffusion.data.fingerprint import STATE_KEY, fingerprint_local, fingerprint_mismatches
from diffusion.data.licenses import allowed_licenses
from diffusion.data.shard_integrity import AUTO, ShardIntegrityError, choose_validate_hash, verify_local_shards

__all__ = ['DataChangedError', 'FaultTolerantStreamingDataset', 'LicenseError', 'ShardDownloadError', 'UnusableSample']

log = logging.getLogger(__name__)


class UnusableSample(ValueError):
    """A sample that cannot train, with a one-word ``reason`` (``truncated``, ``empty_caption``, ...).

    Args:
        reason (str): Why, in one word.
        detail (str): More about it, e.g. the decoder's message. Default: ``''``.
        source (str, optional): Where the sample came from (its ``source_url`` or ``key``). Default: ``None``.
    """

    def __init__(self, reason: str, detail: str = '', source: Optional[str] = None):
        self.reason = reason
        self.detail = detail
        self.source = source
        super().__init__(f'{reason}: {detail}' if detail else reason)

    def __reduce__(self) -> tuple:
        # Rebuild from the constructor's arguments so the error survives pickling between worker processes.
        return type(self), (self.reason, self.detail, self.source)


class ShardDownloadError(RuntimeError):
    """A shard that could not be downloaded or decompressed, after streaming's retries."""


class LicenseError(ValueError):
    """A sample whose license is outside the run's ``license_preset`` (or that has no license column)."""


class DataChangedError(ValueError):
    """A checkpoint taken on other data than the dataset now holds (its fingerprint differs)."""


class FaultTolerantStreamingDataset(StreamingDataset):
    """``StreamingDataset`` with checked shards, clear shard errors and replacement of unusable samples.

    Subclasses implement :meth:`load_sample`, raising :class:`UnusableSample` for a sample that cannot train.

    Args:
        validate_hash (str, optional): Hash checked when a shard is downloaded or decompressed and, with
            ``verify_local_shards``, at start-up: ``'auto'`` (the fastest one the index records, ``xxh64`` for the
            shards this project writes; nothing, with a warning, for shards written without hashes), an algorithm
            the index records (``'sha1'``, ``'xxh64'``), or ``None`` to check no hash. Default: ``'auto'``.
        verify_local_shards (bool): At start-up, check the size and hash of every shard file already on local disk
            (a local dataset read in place, or the cache of a remote one), and that a local dataset has all its
            shards. Costs one read of those files, split over the ranks of a node. Default: ``True``.
        max_replacement_tries (int): How many following samples may be tried in place of an unusable one before
            giving up with an error. Default: ``100``.
        license_preset (str, optional): Check each sample's ``license`` against this preset of
            :mod:`diffusion.data.licenses` (``'commercial'``, ``'noncommercial'``, ``'all'``) and raise
            :class:`LicenseError` for one outside it. Default: ``None`` (no check).
        allow_changed_data (bool): Resume from a checkpoint whose data fingerprint differs from this dataset's
            (shards added, removed or rewritten since), with a warning, instead of refusing. Default: ``False``.
        **streaming_kwargs: Passed to ``StreamingDataset`` (``remote``, ``local``, ``download_retry``,
            ``download_timeout``, ...).
    """

    def __init__(
        self,
        *,
        validate_hash: Optional[str] = AUTO,
        verify_local_shards: bool = True,
        max_replacement_tries: int = 100,
        license_preset: Optional[str] = None,
        allow_changed_data: bool = False,
        **streaming_kwargs: Any,
    ):
        if max_replacement_tries < 0:
            raise ValueError(f'max_replacement_tries must be >= 0, got {max_replacement_tries}.')
        self.license_preset = license_preset
        self._allowed_licenses = None if license_preset is None else allowed_licenses(license_preset)
        super().__init__(validate_hash=None, **streaming_kwargs)
        self.max_replacement_tries = max_replacement_tries
        self._shard_error: Optional[Exception] = None
        for stream_id, stream in enumerate(self.streams):
            # A Stream given its own validate_hash keeps it; the others get this dataset's.
            requested = stream.validate_hash or validate_hash
            stream.validate_hash = choose_validate_hash(requested, self._stream_shards(stream_id), _where(stream))
        if verify_local_shards:
            self._verify_local_shards()
        self.allow_changed_data = allow_changed_data
        self._nothing_to_prepare = self._shards_local_in_place()
        # Taken now, from the index.json files streaming just read: what this run trains on.
        self._fingerprint = [fingerprint_local(_local_dir(stream), _where(stream)) for stream in self.streams]

    def fingerprint(self) -> list[dict[str, Any]]:
        """Per stream ``{'location', 'index_sha256', 'num_samples'}`` (:mod:`diffusion.data.fingerprint`)."""
        return [dict(entry) for entry in self._fingerprint]

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """Streaming's resumption state, with the dataset's fingerprint under ``'data_fingerprint'``."""
        return {**super().state_dict(num_samples, from_beginning), STATE_KEY: self.fingerprint()}

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        """Streaming's ``load_state_dict``, after :meth:`check_fingerprint` of the saved fingerprint."""
        obj = dict(obj)
        self.check_fingerprint(obj.pop(STATE_KEY, None))
        super().load_state_dict(obj)

    def check_fingerprint(self, saved: Optional[list[dict[str, Any]]]) -> bool:
        """Compare a checkpoint's data fingerprint with this dataset's; return whether the data changed.

        A checkpoint without one (written before fingerprints were recorded) passes with a warning.

        Raises:
            DataChangedError: If they differ and ``allow_changed_data`` is not set, naming each stream that
                differs with its saved and current sample count and ``index.json`` digest.
        """
        if saved is None:
            log.warning(
                'The checkpoint records no data fingerprint (it predates them), so whether it trained on the data '
                'of %s cannot be checked.',
                ', '.join(entry['location'] for entry in self._fingerprint),
            )
            return False
        differences = fingerprint_mismatches(saved, self._fingerprint)
        if not differences:
            return False
        message = f'The training data changed since the checkpoint was taken: {"; ".join(differences)}.'
        if not self.allow_changed_data:
            raise DataChangedError(
                f'{message} Resume on the data the checkpoint trained on, or set '
                'train_dataloader.allow_changed_data: true to continue on the data as they are now.'
            )
        log.warning('%s Continuing on the data as they are now (allow_changed_data).', message)
        return True

    def load_sample(self, index: int) -> dict[str, Any]:
        """The training sample ``index``; raises :class:`UnusableSample` when it cannot train."""
        raise NotImplementedError

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        """Streaming's raw sample, with its license checked against ``license_preset``.

        Raises:
            UnusableSample: ``not_utf8``, naming the column, for a text column whose bytes are not UTF-8
                (streaming's decoder would raise a bare ``UnicodeDecodeError`` naming no sample or shard).
        """
        try:
            sample = super().get_item(sample_id, retry)
        except UnicodeDecodeError as error:
            raise self._undecodable_text(sample_id, error) from error
        if self._allowed_licenses is not None:
            license_id = sample.get('license') if isinstance(sample, dict) else None
            if license_id not in self._allowed_licenses:
                found = 'no license column' if license_id is None else f'license {license_id!r}'
                raise LicenseError(
                    f'{self.describe(sample_id)} has {found}, outside license_preset={self.license_preset!r} '
                    f'({", ".join(sorted(self._allowed_licenses))}). Train on data filtered with '
                    f'`python -m diffusion.pipeline filter --preset {self.license_preset}`.'
                )
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Sample ``index``, or the next usable one (wrapping) with ``replaced = 1`` when it is unusable.

        Raises:
            ValueError: If ``max_replacement_tries`` samples after an unusable one are unusable too.
        """
        tries = min(self.max_replacement_tries, self.num_samples - 1) + 1
        unusable: list[tuple[int, UnusableSample]] = []
        for offset in range(tries):
            candidate = (index + offset) % self.num_samples
            try:
                sample = self.load_sample(candidate)
            except UnusableSample as error:
                unusable.append((candidate, error))
                continue
            for bad, error in unusable:
                log.warning('Replacing %s by sample %d: %s', self.describe(bad, error.source), candidate, error)
            sample['replaced'] = int(offset > 0)
            return sample
        first = unusable[0][1]
        raise ValueError(
            f'Cannot replace {self.describe(index, first.source)}: it and the {tries - 1} samples tried after it are '
            f'unusable. The first failure: {first}'
        ) from first

    def _undecodable_text(self, sample_id: int, error: UnicodeDecodeError) -> UnusableSample:
        """The :class:`UnusableSample` of a sample whose text does not decode, naming its columns where it can."""
        columns, source = [], None
        try:
            shard_id, shard_sample_id = self.spanner[sample_id]
            shard = self.shards[shard_id]
            # Streaming's own MDS decoder, with its text columns read as raw bytes, to find which fail.
            raw_text = ['bytes' if encoding == 'str' else encoding for encoding in shard.column_encodings]
            layout = SimpleNamespace(
                column_names=shard.column_names, column_sizes=shard.column_sizes, column_encodings=raw_text
            )
            raw = type(shard).decode_sample(layout, shard.get_sample_data(shard_sample_id))
            texts = {
                name: raw[name]
                for name, encoding in zip(shard.column_names, shard.column_encodings)
                if encoding == 'str'
            }
            for name, data in texts.items():
                try:
                    texts[name] = data.decode('utf-8')
                except UnicodeDecodeError:
                    columns.append(name)
            source = next((texts[key] for key in ('source_url', 'key') if isinstance(texts.get(key), str)), None)
        except Exception:  # not an MDS shard: the decoder's message alone says what failed
            pass
        where = f'column {", ".join(map(repr, columns))} is not UTF-8' if columns else 'text that is not UTF-8'
        return UnusableSample('not_utf8', f'{where} ({error})', source or None)

    def describe(self, index: int, source: Optional[str] = None) -> str:
        """``'sample 7 (https://...) in shard.00000.mds'``: a sample as log messages name it."""
        shard_id, _ = self.spanner[index]
        basename = self.shards[shard_id].file_pairs[0][0].basename
        return f'sample {index} ({source}) in {basename}' if source else f'sample {index} in {basename}'

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """Streaming's ``prepare_shard``, failing with an error that names the shard (kept for ``__iter__``)."""
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as error:
            failure = self._shard_failure(shard_id, error)
            # Streaming leaves the shard PREPARING in shared memory, where other workers would wait for it forever.
            # Back at REMOTE, each of them tries it and fails with this same error.
            with self._cache_filelock:
                self._shard_states[shard_id] = _ShardState.REMOTE
            self._shard_error = failure
            iterator = getattr(self, '_iterator', None)
            if not blocking and iterator is not None:
                # A background (prepare or ready) thread dies here without telling streaming's iterator that it
                # exited, and the iterator's exit() would then wait for it forever once the epoch's loop ends.
                iterator.on_exit()
            raise failure from error

    def _shards_local_in_place(self) -> bool:
        """Whether every shard is read where it lies, uncompressed, and cannot be evicted: nothing to prepare."""
        if self.cache_limit or not all(_in_place(stream) for stream in self.streams):
            return False
        for stream_id, stream in enumerate(self.streams):
            for shard in self._stream_shards(stream_id):
                for raw_info, _ in shard.file_pairs:
                    if not os.path.isfile(os.path.join(_local_dir(stream), raw_info.basename)):
                        return False
        return True

    def _prepare_thread(self, it: Any) -> None:
        """Streaming's download thread; with every shard local in place, nothing to download: done at once."""
        if not self._nothing_to_prepare:
            return super()._prepare_thread(it)
        it.prepare_index = it.total
        it.on_exit()

    def _ready_thread(self, it: Any) -> None:
        """Mark the epoch's samples ready as their shards become local (all at once when read in place).

        Streaming's own ready thread waits for a shard that another DataLoader worker is downloading until it is
        local, checking only this process's failure flag. When that download fails, the shard goes back to REMOTE
        (see :meth:`prepare_shard`) and the wait never ends: the epoch hangs instead of failing. Here a shard found
        REMOTE while waiting is tried again by this worker, which then fails with the shard's own error.
        """
        if self._nothing_to_prepare:
            it.ready_index = it.total
            it.on_exit()
            return
        while it.ready_index < it.total and not it.should_exit() and not self._event.is_set():
            if self.predownload is not None and it.ready_index - it.yield_index > self.predownload:
                time.sleep(TICK)
                continue
            sample_id = it.sample_ids[it.ready_index]
            if sample_id != -1:
                shard_id, _ = self.spanner[sample_id]
                while self._shard_states[shard_id] != _ShardState.LOCAL and not self._event.is_set():
                    if self._shard_states[shard_id] == _ShardState.REMOTE:
                        self.prepare_shard(shard_id, False)  # downloads it, or raises naming the shard
                    else:
                        time.sleep(TICK)  # another worker is preparing it
            it.ready_index += 1
        it.on_exit()

    def __iter__(self):
        try:
            yield from super().__iter__()
        except RuntimeError as error:
            if self._shard_error is None or error is self._shard_error:
                raise
            # "Background thread failed", the symptom of a shard error in an earlier epoch, says less than that error.
            raise self._shard_error from error
        if self._shard_error is not None:
            # The background download thread failed, and streaming ended the epoch early without an error.
            raise self._shard_error

    def _stream_shards(self, stream_id: int) -> Sequence[Reader]:
        begin = int(self.shard_offset_per_stream[stream_id])
        return self.shards[begin : begin + int(self.shards_per_stream[stream_id])]

    def _verify_local_shards(self) -> None:
        start = time.perf_counter()
        checked = 0
        for stream_id, stream in enumerate(self.streams):
            checked += verify_local_shards(
                self._stream_shards(stream_id),
                _local_dir(stream),
                stream.validate_hash,
                in_place=_in_place(stream),
                rank=dist.get_local_rank(),
                num_ranks=dist.get_local_world_size(),
            )
        if checked:
            seconds = time.perf_counter() - start
            log.info('Checked %.3f GB of local shards in %.1f s.', checked / 1e9, seconds)

    def _shard_failure(self, shard_id: int, error: Exception) -> Exception:
        stream = self.streams[int(self.stream_per_shard[shard_id])]
        raw_info, zip_info = self.shards[shard_id].file_pairs[0]
        basename = (zip_info or raw_info).basename
        if str(error).startswith('Checksum failure'):
            if not _in_place(stream):
                # Drop the bad copy, so that the next attempt or run downloads the shard again.
                for info in (raw_info, zip_info):
                    if info and os.path.isfile(os.path.join(_local_dir(stream), info.basename)):
                        os.remove(os.path.join(_local_dir(stream), info.basename))
            return ShardIntegrityError(
                f'{basename} from {_where(stream)} fails its {stream.validate_hash} check: it differs from what '
                f'index.json records ({error}).'
            )
        if _in_place(stream):
            return ShardDownloadError(f'{basename} of the local dataset {_local_dir(stream)} cannot be read: {error}')
        return ShardDownloadError(
            f'Cannot download {basename} from {_where(stream)} after {stream.download_retry} attempt(s) '
            f'(download_timeout={stream.download_timeout}s): {error}. index.json lists this shard: check that the '
            'file exists at the remote and can be read with these credentials.'
        )


def _local_dir(stream: Any) -> str:
    return os.path.join(stream.local, stream.split) if stream.split else stream.local


def _in_place(stream: Any) -> bool:
    """Whether the stream reads its dataset where it lies, so that its local files are the only copy."""
    return stream.remote in (None, stream.local)


def _where(stream: Any) -> str:
    return stream.remote or _local_dir(stream)
