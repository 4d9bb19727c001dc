"""Raw inputs of the ingest stage: the released CommonCatalog parquet files, other parquet files, a folder of images
with a metadata file (CSV, JSON lines or parquet), and webdataset tar shards.

Each source cuts its input into units that depend only on the input (``unit_size`` rows of one file, or one tar
file), and yields, per unit, raw samples (a dict of :data:`RAW_FIELDS`) or a :class:`~diffusion.pipeline.runner.Drop`
for a sample that cannot even be read. Column names are matched against the spellings found in the wild
(:data:`ALIASES`); a file that lacks a required column fails at start, naming the file and the accepted names.
Parquet is read with pyarrow one row group at a time, so a unit never loads more than it needs; parquet inputs may be
``s3://`` files or prefixes, read through ``pyarrow.fs.S3FileSystem`` (``S3_ENDPOINT_URL`` for other endpoints).
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import tarfile
from typing import Any, Iterator, Optional, Sequence

import pyarrow.parquet as pq

from diffusion.pipeline.runner import Drop

__all__ = ['ALIASES', 'RAW_FIELDS', 'SOURCES', 'FolderSource', 'ParquetSource', 'WebDatasetSource', 'build_source']

# Accepted column names per field, in order of preference.
ALIASES: dict[str, tuple[str, ...]] = {
    'image': ('image', 'jpg', 'jpeg', 'png', 'webp', 'image_bytes', 'bytes'),
    'path': ('path', 'image_path', 'file', 'filename', 'file_name'),
    'key': ('key', 'photoid', 'id', '__key__'),
    'source_url': ('source_url', 'url', 'page_url', 'photo_url', 'downloadurl'),
    'license': ('license', 'licensename', 'license_name'),
    'license_url': ('license_url', 'licenseurl'),
    'attribution': ('attribution', 'author', 'creator', 'artist', 'ownername', 'owner'),
    'title': ('title', 'name'),
    'caption': ('blip2_caption', 'synthetic_caption'),
    'original_caption': ('caption', 'alt', 'alt_text', 'description', 'text'),
    # The size of the image before the provider downscaled it (CommonCatalog's jpg is smaller than the Flickr one).
    'original_width': ('original_width',),
    'original_height': ('original_height',),
}
SIZE_FIELDS = ('original_width', 'original_height')
RAW_FIELDS = ('key', 'path', 'image', 'source_url', 'license', 'license_url', 'attribution', 'title', 'caption',
              'original_caption', 'original_width', 'original_height')  # fmt: skip
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.gif', '.bmp', '.tif', '.tiff')


def _column(columns: Sequence[str], field: str) -> Optional[str]:
    lowered = {c.lower(): c for c in columns}
    return next((lowered[a] for a in ALIASES[field] if a in lowered), None)


def _require(columns: Sequence[str], fields: Sequence[str], where: str) -> None:
    """Fail at start when a whole column is missing (``fields`` entries like ``'image|path'`` need either)."""
    for spec in fields:
        options = spec.split('|')
        if not any(_column(columns, f) for f in options):
            accepted = ', '.join(a for f in options for a in ALIASES[f])
            raise ValueError(f'{where} has no {" or ".join(options)} column (accepted names: {accepted}).')


def _text(value: Any) -> Optional[str]:
    """A text value as ``str``; bytes must be UTF-8 (``UnicodeDecodeError`` otherwise); ``None`` stays ``None``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bytes):
        return value.decode('utf-8')
    text = str(value)
    text.encode('utf-8')  # raises on lone surrogates, i.e. bytes that were not UTF-8 in a CSV file
    return text


def _size(value: Any) -> Optional[int]:
    """A declared size in pixels, or ``None`` when absent or not a positive number."""
    try:
        size = int(value)
    except (TypeError, ValueError):
        return None
    return size if size > 0 else None


def map_row(row: dict[str, Any], key: str, path_hint: str = '') -> dict[str, Any] | Drop:
    """Map a metadata row to the raw fields, or a ``bad_text_encoding`` drop naming the bad field."""
    sample: dict[str, Any] = {'key': key, 'path': path_hint}
    columns = list(row)
    for field in RAW_FIELDS:
        column = _column(columns, field) if field in ALIASES else None
        if column is None:
            sample.setdefault(field, None)
            continue
        value = row[column]
        if field == 'image':
            sample[field] = value
            continue
        if field in SIZE_FIELDS:
            sample[field] = _size(value)
            continue
        try:
            sample[field] = _text(value)
        except (UnicodeDecodeError, UnicodeEncodeError):
            return Drop('bad_text_encoding', key, path_hint, detail=f'{column} is not valid UTF-8')
    if sample['key'] is None or sample['key'] == '':
        sample['key'] = key
    sample['key'] = str(sample['key'])
    return sample


def _commoncatalog(row: dict[str, Any], sample: dict[str, Any]) -> dict[str, Any]:
    """CommonCatalog has no author name or page URL: both come from the Flickr user and photo ids (YFCC100M)."""
    uid, photoid = row.get('uid'), row.get('photoid')
    if not sample.get('attribution') and uid:
        sample['attribution'] = f'Flickr user {uid}'
    if not sample.get('source_url') and uid and photoid:
        sample['source_url'] = f'https://www.flickr.com/photos/{uid}/{photoid}'
    if not sample.get('original_caption'):
        parts = [_text(row.get(c)) for c in ('title', 'description')]
        sample['original_caption'] = ' '.join(p for p in parts if p) or None
    return sample


class ParquetSource:
    """Parquet files holding image bytes (or paths) and metadata; ``flavor='commoncatalog'`` reads the release.

    Args:
        paths (list[str]): Parquet files, folders of them, or glob patterns.
        unit_size (int): Rows per unit of work. Default: ``1000``.
        flavor (str): ``'parquet'`` or ``'commoncatalog'``. Default: ``'parquet'``.
    """

    def __init__(self, paths: Sequence[str], unit_size: int = 1000, flavor: str = 'parquet'):
        self.files = _expand_remote(paths, ('.parquet',)) if any('://' in p for p in paths) else _expand(
            paths, ('.parquet',))  # fmt: skip
        self.flavor = flavor
        self.unit_size = unit_size
        self.units: list[tuple[int, int]] = []  # (file index, first row)
        required = ['image|path', 'license'] + ([] if flavor == 'commoncatalog' else ['attribution'])
        for index, path in enumerate(self.files):
            metadata = open_parquet(path)
            _require(metadata.schema_arrow.names, required, path)
            rows = metadata.metadata.num_rows
            self.units += [(index, start) for start in range(0, rows, unit_size)]

    def __len__(self) -> int:
        return len(self.units)

    def read_unit(self, unit: int) -> Iterator[dict[str, Any] | Drop]:
        file_index, start = self.units[unit]
        path = self.files[file_index]
        parquet = open_parquet(path)
        end = start + self.unit_size
        first = 0
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            lo, hi = max(start, first), min(end, first + rows)
            if lo < hi:
                table = parquet.read_row_group(group).slice(lo - first, hi - lo)
                for offset, row in enumerate(table.to_pylist()):
                    yield self._sample(row, path, lo + offset)
            first += rows

    def _sample(self, row: dict[str, Any], path: str, row_index: int) -> dict[str, Any] | Drop:
        where = f'{path}:{row_index}'
        sample = map_row(row, key=where, path_hint=where)
        if isinstance(sample, Drop):
            return sample
        if self.flavor == 'commoncatalog':
            sample = _commoncatalog(row, sample)
        if sample['image'] is None and sample['path']:
            sample['image'] = _read_file(os.path.join(os.path.dirname(path), sample['path']))
            sample['path'] = os.path.join(os.path.dirname(path), sample['path'])
        return sample


class FolderSource:
    """A folder of image files described by one metadata file (``.csv``, ``.jsonl``/``.json`` or ``.parquet``).

    Args:
        metadata (str): The metadata file; image paths in it are relative to ``image_root``.
        image_root (str, optional): Folder the paths are relative to. Default: the metadata file's folder.
        unit_size (int): Rows per unit of work. Default: ``1000``.
    """

    def __init__(self, metadata: str, image_root: Optional[str] = None, unit_size: int = 1000):
        if not os.path.isfile(metadata):
            raise FileNotFoundError(f'Metadata file {metadata} does not exist.')
        self.metadata = metadata
        self.image_root = image_root or os.path.dirname(os.path.abspath(metadata))
        if not os.path.isdir(self.image_root):
            raise FileNotFoundError(f'Image folder {self.image_root} does not exist.')
        self.unit_size = unit_size
        self.rows = _read_metadata(metadata)
        columns = sorted({c for row in self.rows if isinstance(row, dict) for c in row})
        _require(columns, ['path', 'license', 'attribution'], metadata)

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.unit_size)

    def read_unit(self, unit: int) -> Iterator[dict[str, Any] | Drop]:
        start = unit * self.unit_size
        for index, row in enumerate(self.rows[start : start + self.unit_size], start):
            where = f'{self.metadata}:{index + 1}'
            if isinstance(row, Drop):
                row.key = row.path = where
                yield row
                continue
            sample = map_row(row, key=where, path_hint=where)
            if isinstance(sample, Drop) or not sample['path']:
                yield sample if isinstance(sample, Drop) else Drop('missing_field', where, where, detail='path')
                continue
            file_path = os.path.join(self.image_root, sample['path'])
            sample['path'] = file_path
            if sample['key'] == where:
                sample['key'] = os.path.relpath(file_path, self.image_root)
            sample['image'] = _read_file(file_path)
            yield sample


class WebDatasetSource:
    """Webdataset tar shards: members ``<key>.<ext>`` grouped by key, an image plus a ``.json`` of metadata (and
    optionally a ``.txt`` caption). One tar file is one unit.

    Args:
        paths (list[str]): Tar files, folders of them, or glob patterns.
    """

    def __init__(self, paths: Sequence[str]):
        self.files = _expand(paths, ('.tar',))

    def __len__(self) -> int:
        return len(self.files)

    def read_unit(self, unit: int) -> Iterator[dict[str, Any] | Drop]:
        path = self.files[unit]
        with tarfile.open(path) as tar:
            group: dict[str, bytes] = {}
            current = None
            for member in tar:
                if not member.isfile():
                    continue
                name = os.path.basename(member.name)
                key, _, extension = name.partition('.')
                key = os.path.join(os.path.dirname(member.name), key)
                if key != current and current is not None:
                    yield self._sample(path, current, group)
                    group = {}
                current = key
                group[extension.lower()] = tar.extractfile(member).read()
            if current is not None:
                yield self._sample(path, current, group)

    @staticmethod
    def _sample(path: str, key: str, group: dict[str, bytes]) -> dict[str, Any] | Drop:
        where = f'{path}:{key}'
        image_ext = next((e for e in group if '.' + e in IMAGE_EXTENSIONS), None)
        if image_ext is None:
            return Drop('missing_field', key, where, detail='no image member')
        if 'json' not in group:
            return Drop('missing_field', key, where, detail='no json member')
        try:
            row = json.loads(group['json'].decode('utf-8'))
            caption = group['txt'].decode('utf-8') if 'txt' in group else None
        except UnicodeDecodeError:
            return Drop('bad_text_encoding', key, where, detail='json/txt member is not valid UTF-8')
        except json.JSONDecodeError as error:
            return Drop('missing_field', key, where, detail=f'unreadable json member: {error}')
        sample = map_row(row, key=key, path_hint=f'{where}.{image_ext}')
        if isinstance(sample, Drop):
            return sample
        sample['image'] = group[image_ext]
        sample['original_caption'] = sample['original_caption'] or caption
        return sample


def _s3() -> Any:
    """pyarrow's S3 filesystem, with ``S3_ENDPOINT_URL`` (an S3-compatible store) when it is set."""
    from pyarrow import fs

    endpoint = os.environ.get('S3_ENDPOINT_URL')
    kwargs: dict[str, Any] = {'region': os.environ.get('AWS_DEFAULT_REGION', 'us-east-1')}
    if endpoint:
        scheme, _, host = endpoint.partition('://')
        kwargs.update(endpoint_override=host, scheme=scheme)
    return fs.S3FileSystem(**kwargs)


def open_parquet(path: str) -> pq.ParquetFile:
    """A local or ``s3://`` parquet file."""
    if path.startswith('s3://'):
        return pq.ParquetFile(path[len('s3://') :], filesystem=_s3())
    return pq.ParquetFile(path)


def _expand_remote(paths: Sequence[str], extensions: tuple[str, ...]) -> list[str]:
    """``s3://`` files, or every file under an ``s3://`` prefix, with one of ``extensions``, sorted."""
    from pyarrow import fs

    found: list[str] = []
    for path in paths:
        if not path.startswith('s3://'):
            raise ValueError(f'Input {path}: remote parquet inputs must be s3:// URLs (local paths need no scheme).')
        info = _s3().get_file_info(path[len('s3://') :])
        if info.type == fs.FileType.File:
            found.append(path)
        elif info.type == fs.FileType.Directory:
            listing = _s3().get_file_info(fs.FileSelector(path[len('s3://') :], recursive=True))
            found += [f's3://{i.path}' for i in listing if i.type == fs.FileType.File and i.path.lower().endswith(
                extensions)]  # fmt: skip
        else:
            raise FileNotFoundError(f'Input {path} does not exist.')
    if not found:
        raise FileNotFoundError(f'No {"/".join(extensions)} files in {", ".join(paths)}.')
    return sorted(set(found))


def _expand(paths: Sequence[str], extensions: tuple[str, ...]) -> list[str]:
    """Files named by ``paths`` (files, folders searched recursively, globs), sorted for a stable unit order."""
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found += [
                os.path.join(d, f) for d, _, files in os.walk(path) for f in files if f.lower().endswith(extensions)
            ]
        elif os.path.isfile(path):
            found.append(path)
        else:
            matches = glob.glob(path)
            if not matches:
                raise FileNotFoundError(f'Input {path} does not exist.')
            found += [m for m in matches if os.path.isfile(m)]
    if not found:
        raise FileNotFoundError(f'No {"/".join(extensions)} files in {", ".join(paths)}.')
    return sorted(set(found))


def _read_file(path: str) -> Optional[bytes]:
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError:
        return None  # reported as missing_file by ingest, which knows the sample's license


def _read_metadata(path: str) -> list[dict[str, Any] | Drop]:
    """Rows of a CSV, JSON lines or parquet file; a line that is not valid UTF-8 or JSON becomes a Drop."""
    lower = path.lower()
    if lower.endswith('.parquet'):
        return pq.read_table(path).to_pylist()
    if lower.endswith('.csv'):
        # surrogateescape keeps non-UTF-8 bytes visible to map_row, which drops the row, instead of failing the file.
        with open(path, newline='', encoding='utf-8', errors='surrogateescape') as f:
            return list(csv.DictReader(f))
    if lower.endswith(('.jsonl', '.json')):
        rows: list[dict[str, Any] | Drop] = []
        with open(path, 'rb') as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line.decode('utf-8')))
                except UnicodeDecodeError:
                    rows.append(Drop('bad_text_encoding', '', detail='metadata line is not valid UTF-8'))
                except json.JSONDecodeError as error:
                    rows.append(Drop('missing_field', '', detail=f'unreadable metadata line: {error}'))
        return rows
    raise ValueError(f'Metadata file {path} must be .csv, .jsonl/.json or .parquet.')


SOURCES = ('commoncatalog', 'parquet', 'folder', 'webdataset')


def build_source(kind: str, inputs: Sequence[str], *, unit_size: int = 1000, image_root: Optional[str] = None):
    """The source of ``kind`` (one of :data:`SOURCES`) over ``inputs``."""
    if kind in ('commoncatalog', 'parquet'):
        return ParquetSource(inputs, unit_size=unit_size, flavor=kind)
    if kind == 'folder':
        if len(inputs) != 1:
            raise ValueError(f'The folder source takes one metadata file, got {len(inputs)}: {list(inputs)}.')
        return FolderSource(inputs[0], image_root=image_root, unit_size=unit_size)
    if kind == 'webdataset':
        return WebDatasetSource(inputs)
    raise ValueError(f'Unknown source {kind!r}. Valid sources: {", ".join(SOURCES)}.')
