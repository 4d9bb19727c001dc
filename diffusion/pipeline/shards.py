"""Reading and writing the pipeline's MDS datasets, locally or on object storage.

Built on mosaicml-streaming: ``MDSWriter`` (with its cloud uploaders) writes, ``reader_from_json`` and
``decompress`` read single shards, ``CloudDownloader``/``CloudUploader`` move files, and ``merge_index`` joins the
per-unit index files. A stage reads its input one shard at a time (that is its unit of work), so it never needs a
``StreamingDataset`` with its shared-memory cache, and a rank only downloads the shards it was given.

Layout of a stage's output folder::

    out/index.json              merged index of every unit (written last)
    out/pipeline.json           the stage's settings, checked on a rerun
    out/unit-000007/            MDS shards of unit 7 + index.json
    out/unit-000007/samples.jsonl   one line per written sample: key, hashes, license, sizes (no image)
    out/unit-000007/stats.json      counts kept/dropped; written last, so it marks the unit as finished
    out/_work/                  the filter's spilled global passes while it runs; removed when it succeeds
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import urllib.parse
from typing import Any, Iterator, Optional

from streaming import MDSWriter
from streaming.base.compression import decompress
from streaming.base.format import reader_from_json
from streaming.base.storage import CloudUploader, GCSUploader, OCIUploader, S3Uploader
from streaming.base.storage.download import CloudDownloader
from streaming.base.storage.upload import GCSAuthentication
from streaming.base.util import merge_index

__all__ = [
    'MDS_COLUMNS',
    'InputDataset',
    'OutputDataset',
    'SIDE_COLUMNS',
    'is_remote',
    'join',
    'require_input',
]

# The columns of every dataset the pipeline writes. ``caption`` is the caption that trains by default (the
# synthetic one once the caption stage ran), ``original_caption`` the alt text/title that came with the image.
MDS_COLUMNS: dict[str, str] = {
    'image': 'bytes',
    'caption': 'str',
    'original_caption': 'str',
    'license': 'str',
    'attribution': 'str',
    'source_url': 'str',
    'title': 'str',
    'width': 'int',
    'height': 'int',
    'original_width': 'int',
    'original_height': 'int',
    'key': 'str',
    'sha256': 'str',
    'phash': 'str',
}
# What ``samples.jsonl`` keeps of each sample: enough to filter and deduplicate without reading images.
SIDE_COLUMNS = (
    'key',
    'sha256',
    'phash',
    'license',
    'original_width',
    'original_height',
    'source_url',
    'attribution',
    'title',
)

DOWNLOAD_TIMEOUT = 300
# Sub-folder of an output where a stage spills intermediate files of its global passes (the filter's partitions).
WORK_DIR = '_work'
# Keys per S3 DeleteObjects request (the API's limit).
S3_DELETE_BATCH = 1000


def is_remote(path: str) -> bool:
    """Whether ``path`` is an object-store URL (``s3://``, ``gs://``, ...) rather than a local path."""
    return '://' in path and not path.startswith('file://')


def join(root: str, *parts: str) -> str:
    """Join path parts for local paths and URLs alike."""
    if is_remote(root):
        return '/'.join([root.rstrip('/'), *parts])
    return os.path.join(root, *parts)


def delete_objects(uploader: CloudUploader, bucket: str, keys: list[str]) -> None:
    """Delete ``keys`` of ``bucket`` with the client of a streaming ``uploader``; streaming itself never deletes."""
    if isinstance(uploader, S3Uploader):
        for start in range(0, len(keys), S3_DELETE_BATCH):
            batch = [{'Key': key} for key in keys[start : start + S3_DELETE_BATCH]]
            response = uploader.s3.delete_objects(Bucket=bucket, Delete={'Objects': batch, 'Quiet': True})
            if response.get('Errors'):
                first = response['Errors'][0]
                raise OSError(f'Could not delete s3://{bucket}/{first["Key"]}: {first.get("Message", first)}')
    elif isinstance(uploader, GCSUploader):
        if uploader.authentication == GCSAuthentication.HMAC:  # GCS's S3 API has no batch delete
            for key in keys:
                uploader.gcs_client.delete_object(Bucket=bucket, Key=key)
        else:
            uploader.gcs_client.bucket(bucket).delete_blobs(keys)
    elif isinstance(uploader, OCIUploader):
        bucket = bucket.split('@' + uploader.namespace)[0]
        for key in keys:
            uploader.client.delete_object(uploader.namespace, bucket, key)
    else:
        kind = type(uploader).__name__
        raise NotImplementedError(f'Deleting objects from {uploader.remote} ({kind}) is not supported.')


# One downloader per store scheme and environment (endpoint, credentials) in a process, each keeping its client:
# streaming's direct_download makes a client for every file, 0.1-0.5 s of CPU each, and a stage reads many small
# files (side tables, stats, the filter's spilled passes).
_downloaders: dict[tuple[str, int], CloudDownloader] = {}


def _environment() -> int:
    return hash(frozenset(os.environ.items()))


def _fetch(path: str, local: str) -> str:
    """Return a local path holding the file ``path`` (downloaded to ``local`` when remote)."""
    if not is_remote(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f'{path} does not exist.')
        return path
    os.makedirs(os.path.dirname(local), exist_ok=True)
    key = (urllib.parse.urlparse(path).scheme, _environment())
    try:
        if key not in _downloaders:
            _downloaders[key] = CloudDownloader.get(path)
        _downloaders[key].download(path, local, DOWNLOAD_TIMEOUT)
    except Exception as error:
        raise FileNotFoundError(f'Could not download {path}: {error}') from error
    return local


def require_input(root: str) -> None:
    """Fail at start, naming the folder, when a local input dataset does not exist."""
    if not is_remote(root) and not os.path.isdir(root):
        raise FileNotFoundError(f'Input dataset folder {root} does not exist.')


class InputDataset:
    """An MDS dataset read one shard at a time; the shards are the units of work of the stage reading it.

    Args:
        root (str): Local folder or object-store URL with an ``index.json``.
        cache_dir (str): Local scratch folder for downloaded and decompressed shards.
    """

    def __init__(self, root: str, cache_dir: str):
        self.root = root
        self.cache_dir = cache_dir
        require_input(root)
        index_path = _fetch(join(root, 'index.json'), os.path.join(cache_dir, 'index.json'))
        with open(index_path) as f:
            self.shards: list[dict[str, Any]] = json.load(f)['shards']
        self.offsets = [0]
        for shard in self.shards:
            self.offsets.append(self.offsets[-1] + shard['samples'])

    @property
    def num_samples(self) -> int:
        return self.offsets[-1]

    def __len__(self) -> int:
        return len(self.shards)

    def shard_file(self, index: int) -> str:
        """The shard's data file relative to the root (e.g. ``unit-000003/shard.00000.mds``)."""
        shard = self.shards[index]
        return (shard['zip_data'] or shard['raw_data'])['basename']

    def iter_shard(self, index: int) -> Iterator[dict[str, Any]]:
        """Yield the samples of shard ``index`` in order, downloading and decompressing it as needed."""
        shard = self.shards[index]
        raw_name = shard['raw_data']['basename']
        local_root = os.path.join(self.cache_dir, f'shard-{index}')
        raw_path = os.path.join(local_root, raw_name)
        if not is_remote(self.root) and os.path.exists(os.path.join(self.root, raw_name)):
            local_root = self.root
        elif shard.get('zip_data'):
            zip_name = shard['zip_data']['basename']
            zip_path = _fetch(join(self.root, zip_name), os.path.join(local_root, zip_name))
            with open(zip_path, 'rb') as f:
                data = decompress(shard['compression'], f.read())
            os.makedirs(os.path.dirname(raw_path), exist_ok=True)
            with open(raw_path, 'wb') as f:
                f.write(data)
        else:
            _fetch(join(self.root, raw_name), raw_path)
        reader = reader_from_json(local_root, None, shard)
        try:
            for position in range(shard['samples']):
                yield reader.get_item(position)
        finally:
            if local_root != self.root:
                shutil.rmtree(local_root, ignore_errors=True)

    def read_json_lines(self, relative: str) -> Iterator[dict[str, Any]]:
        """Yield the JSON lines of ``root/relative`` (e.g. a unit's ``samples.jsonl``)."""
        local = _fetch(join(self.root, relative), os.path.join(self.cache_dir, 'side', relative))
        with open(local, encoding='utf-8') as f:
            for line in f:
                yield json.loads(line)


class OutputDataset:
    """A stage's output folder: one MDS sub-folder per unit, finished units marked by their ``stats.json``.

    Args:
        root (str): Local folder or object-store URL.
        scratch_dir (str): Local scratch folder used to stage uploads when ``root`` is remote.
    """

    def __init__(self, root: str, scratch_dir: str):
        self.root = root
        self.scratch_dir = scratch_dir
        self.remote = is_remote(root)
        self._root_uploader: Optional[CloudUploader] = None
        if not self.remote:
            try:
                os.makedirs(root, exist_ok=True)
                probe = tempfile.NamedTemporaryFile(dir=root, prefix='.write-test-')
                probe.close()
            except OSError as error:
                raise PermissionError(f'Output folder {root} is not writable: {error}') from error

    @staticmethod
    def unit_name(unit: int) -> str:
        return f'unit-{unit:06d}'

    def _uploader(self) -> CloudUploader:
        """The root's uploader, made once (its client and bucket check cost 0.1-0.5 s); files are uploaded by their
        path relative to the root from the same relative path under its local folder."""
        if self._root_uploader is None:
            local = os.path.join(self.scratch_dir, 'upload')
            self._root_uploader = CloudUploader.get((local, self.root), exist_ok=True)
        return self._root_uploader

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, '_root_uploader': None}  # a client is not shipped to workers: each makes its own

    def listing(self) -> set[str]:
        """All file paths under the root, relative to it."""
        if not self.remote:
            found = set()
            for directory, _, files in os.walk(self.root):
                rel = os.path.relpath(directory, self.root)
                found.update(os.path.normpath(os.path.join(rel, name)) for name in files)
            return found
        prefix = self.root.split('://', 1)[1].split('/', 1)[1].rstrip('/') + '/'
        return {key[len(prefix) :] for key in self._uploader().list_objects() if key.startswith(prefix)}

    def finished_units(self) -> set[int]:
        """Units whose ``stats.json`` exists, i.e. that completed in an earlier run."""
        done = set()
        for path in self.listing():
            parts = path.split('/')
            if len(parts) == 2 and parts[1] == 'stats.json' and parts[0].startswith('unit-'):
                done.add(int(parts[0][len('unit-') :]))
        return done

    def clear(self) -> None:
        """Remove an earlier run's units, merged index and spilled work files, locally or on object storage.

        On object storage too: a run with other settings must not find the old units' markers (the filter would
        skip its global passes) nor the old spilled decisions (it would apply them).
        """
        if not self.remote:
            for name in os.listdir(self.root):
                if name.startswith('unit-') or name in ('index.json', WORK_DIR):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
                    if os.path.isfile(os.path.join(self.root, name)):
                        os.remove(os.path.join(self.root, name))
            return
        stale = [p for p in self.listing() if p.startswith(('unit-', f'{WORK_DIR}/')) or p == 'index.json']
        self._delete_remote(stale)

    def fetch(self, relative: str) -> str:
        """A local path holding ``root/relative`` (downloaded when remote); ``FileNotFoundError`` when missing."""
        return _fetch(join(self.root, relative), os.path.join(self.scratch_dir, 'read', relative))

    def read_json(self, relative: str) -> Optional[dict[str, Any]]:
        """The JSON file ``root/relative``, or ``None`` when it does not exist."""
        try:
            with open(self.fetch(relative)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def write_text(self, relative: str, text: str) -> None:
        """Write ``text`` to ``root/relative`` (uploaded when remote)."""
        self.write_bytes(relative, text.encode('utf-8'))

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write ``data`` to ``root/relative`` (uploaded when remote)."""
        subdir = os.path.dirname(relative)
        if not self.remote:
            os.makedirs(os.path.join(self.root, subdir), exist_ok=True)
            tmp = os.path.join(self.root, relative + f'.{os.getpid()}.tmp')
            with open(tmp, 'wb') as f:
                f.write(data)
            os.replace(tmp, os.path.join(self.root, relative))  # atomic: a crash never leaves half a marker
            return
        uploader = self._uploader()
        os.makedirs(os.path.join(uploader.local, subdir), exist_ok=True)
        with open(os.path.join(uploader.local, relative), 'wb') as f:
            f.write(data)
        uploader.upload_file(relative)  # and deletes the local copy

    def remove_work(self) -> None:
        """Remove the spilled intermediate files of a finished stage (the ``_work/`` folder or prefix), so that the
        published output holds only the shards, side tables and stats. Call it after a successful run only: a
        crashed run keeps them, and its rerun resumes the global passes from them."""
        if not self.remote:
            shutil.rmtree(os.path.join(self.root, WORK_DIR), ignore_errors=True)
            return
        prefix = f'{WORK_DIR}/'
        try:
            self._delete_remote([p for p in self.listing() if p.startswith(prefix)])
        except NotImplementedError as error:  # the output is complete: a store we cannot delete from keeps _work/
            logging.getLogger(__name__).warning('%s; %s/%s is left in place.', error, self.root, WORK_DIR)

    def _delete_remote(self, relatives: list[str]) -> None:
        """Delete the objects ``root/relative`` from object storage (S3 and S3-compatible stores, GCS, OCI)."""
        if not relatives:
            return
        uploader = self._uploader()
        base = urllib.parse.urlparse(uploader.remote)
        bucket, folder = base.netloc, base.path.strip('/')
        keys = ['/'.join(filter(None, [folder, relative])) for relative in relatives]
        delete_objects(uploader, bucket, keys)

    def writer(self, unit: int, columns: dict[str, str], *, compression: Optional[str], size_limit: str) -> MDSWriter:
        """A fresh ``MDSWriter`` for ``unit``, after removing what a crashed run may have left there."""
        name = self.unit_name(unit)
        if self.remote:
            local = os.path.join(self.scratch_dir, 'units', name)
            shutil.rmtree(local, ignore_errors=True)
            out: Any = (local, join(self.root, name))
        else:
            out = os.path.join(self.root, name)
            shutil.rmtree(out, ignore_errors=True)
        return MDSWriter(
            out=out,
            columns=columns,
            compression=compression,
            hashes=['sha1', 'xxh64'],  # diffusion.data.shard_integrity.SHARD_HASHES: training checks them
            size_limit=size_limit,
            exist_ok=True,
            progress_bar=False,
            keep_local=False if self.remote else True,
        )

    def merge(self, units: list[int]) -> None:
        """Write the root ``index.json`` joining the units' indexes, in unit order."""
        index_files = [join(self.root, self.unit_name(unit), 'index.json') for unit in units]
        out: Any = (os.path.join(self.scratch_dir, 'merged'), self.root) if self.remote else self.root
        root_logger = logging.getLogger()
        level = root_logger.level
        root_logger.setLevel(logging.ERROR)  # merge_index warns about its temporary folder on every call
        try:
            merge_index(index_files, out, keep_local=not self.remote, download_timeout=DOWNLOAD_TIMEOUT)
        finally:
            root_logger.setLevel(level)
