"""The filter stage's decisions over the whole dataset, in memory that does not grow with the dataset.

The rule is the one of :func:`diffusion.pipeline.filtering.decide`, in the dataset's global sample order: a sample
that passes the license, size and aspect rules is an exact duplicate when an earlier *kept* sample has its SHA-256,
a near duplicate when an earlier kept sample's perceptual hash is within ``near_duplicate_distance`` bits, and is
kept otherwise. Instead of one in-memory table, the decisions are made by passes over hash partitions spilled as
Arrow IPC files (pyarrow's ``ipc.new_file`` / ``open_file``, one record batch per destination) under the output's
``_work/`` folder, local or on object storage. Every pass is a list of independent tasks that the stage's engine
schedules (``StageRunner.map_tasks``: the launcher's ranks or Ray tasks), so any number of workers decides the same.

The rows are cut into blocks of whole input units (about ``partition_rows`` rows each):

1. ``rules`` (per block): the per-sample rules; samples that pass are spilled by a hash of their group key (the
   SHA-256, or the perceptual hash when exact duplicates are kept) into ``P`` partitions.
2. ``groups`` (per partition): samples sharing a group key share a fate, that of the first one (the leader): they
   have its bytes and hash, so whatever is close to one is close to all. Leaders are spilled once per band of the
   multi-index hashing of :class:`~diffusion.pipeline.images.NearDuplicateIndex`, partitioned by (band, value);
   followers are spilled by the block of their leader.
3. ``pairs`` (per band partition): leaders with the same band value are compared; pairs within the distance are the
   only candidates (two hashes within ``d`` bits agree on one of ``d + 1`` bands), spilled by the later one's block.
4. ``resolve`` (one task, blocks in order): a leader is a near duplicate of the earliest earlier leader it pairs with
   that is kept. Its state is one bit per row and one block's pairs.
5. ``followers`` (per partition): followers take their leader's fate, spilled by their own block.
6. ``collect`` (per block): the block's drops in row order, which the filter's units read.

Peak memory per task is set by ``partition_rows`` (and the bit per row of ``resolve``): 8 MiB for 67M rows.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa

from diffusion.pipeline.images import _popcount
from diffusion.pipeline.shards import WORK_DIR, InputDataset, OutputDataset

__all__ = ['DedupPlan', 'plan_dedup', 'run_dedup', 'BlockDecisions']

PARTITION_ROWS = 100_000
# Comparisons per numpy call when a band bucket is compared with itself: 4M uint64 = 32 MiB.
_PAIR_CHUNK = 1 << 22

RULE_SCHEMA = pa.schema([('g', pa.int64()), ('reason', pa.string()), ('detail', pa.string())])
GROUP_SCHEMA = pa.schema([('g', pa.int64()), ('gkey', pa.string()), ('phash', pa.uint64()), ('key', pa.string())])
BAND_SCHEMA = pa.schema(
    [('band', pa.int64()), ('value', pa.int64()), ('g', pa.int64()), ('phash', pa.uint64()), ('key', pa.string())]
)
EDGE_SCHEMA = pa.schema([('j', pa.int64()), ('i', pa.int64()), ('i_key', pa.string())])
FOLLOW_SCHEMA = pa.schema([('j', pa.int64()), ('leader', pa.int64()), ('leader_key', pa.string())])
NEAR_SCHEMA = pa.schema([('g', pa.int64()), ('key', pa.string())])


@dataclass
class DedupPlan:
    """How the rows are cut: input units (name, first row, rows), blocks of units, partition counts."""

    units: list[tuple[str, int, int]]
    blocks: list[list[int]]
    block_starts: list[int]
    num_rows: int
    partitions: int
    band_partitions: int
    bands: list[tuple[int, int]]

    def block_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.asarray(self.block_starts), rows, side='right') - 1

    def block_of_row(self, row: int) -> int:
        return bisect_right(self.block_starts, row) - 1


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of each band, as :class:`~diffusion.pipeline.images.NearDuplicateIndex` cuts the 64 bits."""
    count = max_distance + 1
    widths = [64 // count + (1 if i < 64 % count else 0) for i in range(count)]
    return [(64 - sum(widths[: i + 1]), (1 << w) - 1) for i, w in enumerate(widths)]


def plan_dedup(dataset: InputDataset, near_distance: Optional[int], partition_rows: int = PARTITION_ROWS) -> DedupPlan:
    """Cut ``dataset``'s rows into blocks of whole units and choose the partition counts."""
    units: list[tuple[str, int, int]] = []
    for index in range(len(dataset)):
        name = dataset.shard_file(index).split('/')[0]
        if not name.startswith('unit-'):
            raise ValueError(f'{dataset.root} was not written by the pipeline (shards are not in unit folders).')
        if units and units[-1][0] == name:
            units[-1] = (name, units[-1][1], units[-1][2] + dataset.shards[index]['samples'])
        else:
            units.append((name, dataset.offsets[index], dataset.shards[index]['samples']))
    blocks: list[list[int]] = []
    starts: list[int] = []
    rows_in_block = 0
    for index, (_, first, count) in enumerate(units):
        if not blocks or rows_in_block + count > partition_rows:
            blocks.append([])
            starts.append(first)
            rows_in_block = 0
        blocks[-1].append(index)
        rows_in_block += count
    rows = dataset.num_samples
    bands = _bands(near_distance) if near_distance is not None else []
    return DedupPlan(
        units=units,
        blocks=blocks or [[]],
        block_starts=starts or [0],
        num_rows=rows,
        partitions=max(1, math.ceil(rows / partition_rows)),
        band_partitions=max(1, math.ceil(rows * len(bands) / partition_rows)),
        bands=bands,
    )


def _column(values: Any, field: pa.Field) -> pa.Array:
    return pa.array(values, type=field.type)


def _ipc_bytes(schema: pa.Schema, batches: list[dict[str, Any]]) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(pa.record_batch([_column(batch[f.name], f) for f in schema], schema=schema))
    return sink.getvalue().to_pybytes()


def _write_split(
    store: OutputDataset, relative: str, schema: pa.Schema, columns: dict[str, np.ndarray], target: np.ndarray, n: int
) -> None:
    """Write ``columns`` to one Arrow file of ``n`` record batches, row ``k`` into batch ``target[k]``, in order."""
    order = np.argsort(target, kind='stable')
    bounds = np.concatenate([[0], np.cumsum(np.bincount(target, minlength=n))])
    batches = [{name: values[order[bounds[t] : bounds[t + 1]]] for name, values in columns.items()} for t in range(n)]
    store.write_bytes(relative, _ipc_bytes(schema, batches))


class _Reader:
    """Reads record batches of spilled files, downloading a remote file once per process."""

    def __init__(self, store: OutputDataset):
        self.store = store

    def batch(self, relative: str, index: int) -> pa.RecordBatch:
        with pa.memory_map(self.store.fetch(relative)) as source:
            batch = pa.ipc.open_file(source).get_batch(index)
            # Copied out of the memory map, so the file can be closed (and replaced) while the batch lives.
            return pa.ipc.read_record_batch(batch.serialize(), batch.schema)

    def table(self, relatives: list[str], index: int, schema: pa.Schema) -> pa.Table:
        batches = [self.batch(r, index) for r in relatives]
        return pa.Table.from_batches(batches, schema=schema)


def _spilled(folder: str, prefix: str) -> Callable[[int], str]:
    """The names of one pass's spilled files: ``<WORK_DIR>/<folder>/<prefix><index, 6 digits>.arrow``, the prefix
    saying what the index counts (``b`` a block, ``p`` a partition, ``q`` a band partition)."""

    def name(index: int) -> str:
        return f'{WORK_DIR}/{folder}/{prefix}{index:06d}.arrow'

    return name


_rule_file = _spilled('rules', 'b')
_group_file = _spilled('groups', 'b')
_band_file = _spilled('bands', 'p')
_follow_file = _spilled('follow', 'p')
_edge_file = _spilled('edges', 'q')
_near_file = _spilled('near', 'b')
_follower_fate_file = _spilled('fates', 'p')
decision_file = _spilled('decisions', 'b')


def rule_files(plan: DedupPlan) -> list[str]:
    return [_rule_file(b) for b in range(len(plan.blocks))]


def _done(store: OutputDataset, name: str) -> None:
    store.write_text(f'{WORK_DIR}/done/{name}', '')


def run_dedup(
    dataset: InputDataset,
    store: OutputDataset,
    plan: DedupPlan,
    options: Any,
    rule_drop: Callable[[dict[str, Any]], Optional[tuple[str, str]]],
    map_tasks: Callable[[Callable[[Any], Any], list[Any]], None],
) -> None:
    """Run the six passes (skipping tasks whose output an earlier run finished), leaving ``decision_file(b)``."""
    exact = bool(options.exact_duplicates)
    near = options.near_duplicate_distance
    blocks, partitions, band_partitions = len(plan.blocks), plan.partitions, plan.band_partitions
    finished = {p.split('/')[-1] for p in store.listing() if p.startswith(f'{WORK_DIR}/done/')}
    grouping = exact or near is not None

    def todo(name: str, count: int) -> list[int]:
        return [i for i in range(count) if f'{name}-{i}' not in finished]

    def rules(block: int) -> None:
        drops: dict[str, list] = {'g': [], 'reason': [], 'detail': []}
        kept: dict[str, list] = {'g': [], 'gkey': [], 'phash': [], 'key': []}
        for unit in plan.blocks[block]:
            name, first, count = plan.units[unit]
            try:
                rows = list(dataset.read_json_lines(f'{name}/samples.jsonl'))
            except FileNotFoundError as error:
                message = f'{dataset.root}/{name} has no samples.jsonl; rerun the stage that wrote it.'
                raise FileNotFoundError(message) from error
            if len(rows) != count:
                raise ValueError(f'{dataset.root}/{name}: samples.jsonl lists {len(rows)} samples, index.json {count}.')
            for g, row in enumerate(rows, first):
                verdict = rule_drop(row)
                if verdict is not None:
                    drops['g'].append(g)
                    drops['reason'].append(verdict[0])
                    drops['detail'].append(verdict[1])
                elif grouping:
                    kept['g'].append(g)
                    kept['gkey'].append(row['sha256'] if exact else row['phash'])
                    kept['phash'].append(int(row['phash'], 16))
                    kept['key'].append(row['key'])
        store.write_bytes(rule_files(plan)[block], _ipc_bytes(RULE_SCHEMA, [drops]))
        if grouping:
            columns = {
                'g': np.asarray(kept['g'], dtype=np.int64),
                'gkey': np.asarray(kept['gkey'], dtype=object),
                'phash': np.asarray(kept['phash'], dtype=np.uint64),
                'key': np.asarray(kept['key'], dtype=object),
            }
            target = np.asarray([int(k[:15], 16) % partitions for k in kept['gkey']], dtype=np.int64)
            _write_split(store, _group_file(block), GROUP_SCHEMA, columns, target, partitions)
        _done(store, f'rules-{block}')

    def groups(partition: int) -> None:
        reader = _Reader(store)
        table = reader.table([_group_file(b) for b in range(blocks)], partition, GROUP_SCHEMA)
        g = table['g'].to_numpy()
        gkey = table['gkey'].to_numpy(zero_copy_only=False)
        phash = table['phash'].to_numpy()
        keys = table['key'].to_numpy(zero_copy_only=False)
        order = np.lexsort((g, gkey)) if len(g) else np.zeros(0, dtype=np.int64)
        g, gkey, phash, keys = g[order], gkey[order], phash[order], keys[order]
        starts = np.ones(len(g), dtype=bool)
        starts[1:] = gkey[1:] != gkey[:-1]
        leader = np.maximum.accumulate(np.where(starts, np.arange(len(g)), 0)) if len(g) else starts.astype(np.int64)
        followers = np.flatnonzero(~starts)
        if exact and near is not None:
            odd = followers[phash[followers] != phash[leader[followers]]]
            if odd.size:
                a, b = keys[leader[odd[0]]], keys[odd[0]]
                raise ValueError(f'{dataset.root}: samples {a} and {b} have the same sha256 but different phash.')
        follow = {'j': g[followers], 'leader': g[leader[followers]], 'leader_key': keys[leader[followers]]}
        _write_split(store, _follow_file(partition), FOLLOW_SCHEMA, follow, plan.block_of(follow['leader']), blocks)
        if near is not None:
            leaders = np.flatnonzero(starts)
            band_ids, values = [], []
            for band, (shift, mask) in enumerate(plan.bands):
                band_ids.append(np.full(len(leaders), band, dtype=np.int64))
                values.append(((phash[leaders] >> np.uint64(shift)) & np.uint64(mask)).astype(np.int64))
            band_column = np.concatenate(band_ids) if band_ids else np.zeros(0, dtype=np.int64)
            value_column = np.concatenate(values) if values else np.zeros(0, dtype=np.int64)
            repeat = len(plan.bands)
            columns = {
                'band': band_column,
                'value': value_column,
                'g': np.tile(g[leaders], repeat),
                'phash': np.tile(phash[leaders], repeat),
                'key': np.tile(keys[leaders], repeat),
            }
            target = (value_column * len(plan.bands) + band_column) % band_partitions
            _write_split(store, _band_file(partition), BAND_SCHEMA, columns, target, band_partitions)
        _done(store, f'groups-{partition}')

    def pairs(band_partition: int) -> None:
        reader = _Reader(store)
        table = reader.table([_band_file(p) for p in range(partitions)], band_partition, BAND_SCHEMA)
        band, value, g = table['band'].to_numpy(), table['value'].to_numpy(), table['g'].to_numpy()
        phash, keys = table['phash'].to_numpy(), table['key'].to_numpy(zero_copy_only=False)
        order = np.lexsort((g, value, band))
        band, value, g, phash, keys = band[order], value[order], g[order], phash[order], keys[order]
        cut = np.flatnonzero((band[1:] != band[:-1]) | (value[1:] != value[:-1])) + 1
        bounds = np.concatenate([[0], cut, [len(g)]]).astype(np.int64)
        js, is_ = [], []
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end - start < 2:
                continue
            hashes = phash[start:end]
            step = max(1, _PAIR_CHUNK // len(hashes))
            for lo in range(0, len(hashes), step):
                block = _popcount(hashes[lo : lo + step, None] ^ hashes[None, :]) <= near
                earlier, later = np.nonzero(block)
                earlier = earlier + lo
                mask = earlier < later
                is_.append(earlier[mask] + start)
                js.append(later[mask] + start)
        i_pos = np.concatenate(is_) if is_ else np.zeros(0, dtype=np.int64)
        j_pos = np.concatenate(js) if js else np.zeros(0, dtype=np.int64)
        edges = {'j': g[j_pos], 'i': g[i_pos], 'i_key': keys[i_pos]}
        _write_split(store, _edge_file(band_partition), EDGE_SCHEMA, edges, plan.block_of(edges['j']), blocks)
        _done(store, f'pairs-{band_partition}')

    def resolve(_: int) -> None:
        reader = _Reader(store)
        dropped = bytearray(plan.num_rows // 8 + 1)  # the only state that grows: a bit per row
        for block in range(blocks):
            table = reader.table([_edge_file(q) for q in range(band_partitions)], block, EDGE_SCHEMA)
            j, i, i_key = table['j'].to_numpy(), table['i'].to_numpy(), table['i_key'].to_numpy(zero_copy_only=False)
            order = np.lexsort((i, j))
            j, i, i_key = j[order].tolist(), i[order].tolist(), i_key[order].tolist()
            near_g: list[int] = []
            near_key: list[str] = []
            for later, earlier, earlier_key in zip(j, i, i_key):
                if near_g and near_g[-1] == later or dropped[later >> 3] & (1 << (later & 7)):
                    continue  # already a near duplicate of an earlier (smaller) kept row
                if not dropped[earlier >> 3] & (1 << (earlier & 7)):
                    dropped[later >> 3] |= 1 << (later & 7)
                    near_g.append(later)
                    near_key.append(earlier_key)
            store.write_bytes(_near_file(block), _ipc_bytes(NEAR_SCHEMA, [{'g': near_g, 'key': near_key}]))
        _done(store, 'resolve-0')

    def follower_fates(partition: int) -> None:
        reader = _Reader(store)
        fates: dict[str, list] = {'g': [], 'reason': [], 'detail': []}
        for block in range(blocks):
            follow = reader.batch(_follow_file(partition), block)
            if not follow.num_rows:
                continue
            near_drops = reader.batch(_near_file(block), 0) if near is not None else None
            close_to = dict(zip(near_drops['g'].to_pylist(), near_drops['key'].to_pylist())) if near_drops else {}
            columns = zip(follow['j'].to_pylist(), follow['leader'].to_pylist(), follow['leader_key'].to_pylist())
            for j, leader, leader_key in columns:
                fates['g'].append(j)
                if leader in close_to:
                    fates['reason'].append('near_duplicate')
                    fates['detail'].append(f'perceptual hash close to {close_to[leader]}')
                elif exact:
                    fates['reason'].append('exact_duplicate')
                    fates['detail'].append(f'same bytes as {leader_key}')
                else:
                    fates['reason'].append('near_duplicate')
                    fates['detail'].append(f'perceptual hash close to {leader_key}')
        columns = {
            'g': np.asarray(fates['g'], dtype=np.int64),
            'reason': np.asarray(fates['reason'], dtype=object),
            'detail': np.asarray(fates['detail'], dtype=object),
        }
        _write_split(store, _follower_fate_file(partition), RULE_SCHEMA, columns, plan.block_of(columns['g']), blocks)
        _done(store, f'fates-{partition}')

    def collect(block: int) -> None:
        reader = _Reader(store)
        parts = [reader.batch(rule_files(plan)[block], 0)]
        if grouping:
            parts += [reader.batch(_follower_fate_file(p), block) for p in range(partitions)]
        if near is not None:
            near_drops = reader.batch(_near_file(block), 0)
            parts.append(
                pa.record_batch(
                    [
                        near_drops['g'],
                        pa.array(['near_duplicate'] * near_drops.num_rows, pa.string()),
                        pa.array([f'perceptual hash close to {k}' for k in near_drops['key'].to_pylist()], pa.string()),
                    ],
                    schema=RULE_SCHEMA,
                )
            )
        table = pa.Table.from_batches(parts, schema=RULE_SCHEMA).sort_by('g')
        store.write_bytes(decision_file(block), _ipc_bytes(RULE_SCHEMA, [table.to_pydict()]))
        _done(store, f'collect-{block}')

    map_tasks(rules, todo('rules', blocks))
    if grouping:
        map_tasks(groups, todo('groups', partitions))
        if near is not None:
            map_tasks(pairs, todo('pairs', band_partitions))
            map_tasks(resolve, todo('resolve', 1))
        map_tasks(follower_fates, todo('fates', partitions))
    map_tasks(collect, todo('collect', blocks))


class BlockDecisions:
    """The drops of the rows of one block at a time: ``drop_of(row)`` is ``(reason, detail)`` or ``None``."""

    def __init__(self, store: OutputDataset, plan: DedupPlan):
        self.reader = _Reader(store)
        self.plan = plan
        self.block = -1
        self.drops: dict[int, tuple[str, str]] = {}

    def drop_of(self, row: int) -> Optional[tuple[str, str]]:
        block = self.plan.block_of_row(row)
        if block != self.block:
            batch = self.reader.batch(decision_file(block), 0)
            self.drops = dict(
                zip(batch['g'].to_pylist(), zip(batch['reason'].to_pylist(), batch['detail'].to_pylist()))
            )
            self.block = block
        return self.drops.get(row)
