"""Runs one pipeline stage over its units of work, on one or many ranks, resumably.

A stage's input is cut into units that depend only on the input (a slice of parquet rows, a tar file, an MDS
shard), never on the number of ranks; rank ``r`` of ``N`` processes units ``r, r + N, ...``, each into its own
sub-folder, and rank 0 merges the unit indexes in unit order at the end. The merged dataset is therefore the same
whatever ``N`` is, and a rerun after a crash skips every unit whose ``stats.json`` exists (it is written after the
unit's shards, so its presence means the unit is complete) and redoes the others from scratch.

Ranks come from the ``RANK``/``WORLD_SIZE`` variables that the composer launcher and torchrun set; the only
collective is a ``torch.distributed`` barrier (gloo) before the merge. With ``engine='ray'`` the same per-unit work
(:class:`~diffusion.pipeline.engines.UnitWork`) is scheduled by Ray Data instead (:mod:`diffusion.pipeline.engines`)
from one driver process; units, their folders, markers and the merge are the same, so is the output.
"""

from __future__ import annotations

import atexit
import copy
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch.distributed as torch_dist
from tqdm.auto import tqdm

from diffusion.pipeline.engines import ENGINES, UnitWork, ray_map_tasks, ray_run_units
from diffusion.pipeline.shards import MDS_COLUMNS, SIDE_COLUMNS, OutputDataset

__all__ = ['Drop', 'RankInfo', 'StageRunner', 'UnitStats', 'rank_info']


@dataclass(frozen=True)
class RankInfo:
    """This process's place among the ranks of a pipeline run."""

    rank: int
    world_size: int
    local_rank: int


def rank_info() -> RankInfo:
    """Read the rank from the launcher's environment (a single rank when there is none)."""
    env = os.environ
    return RankInfo(int(env.get('RANK', 0)), int(env.get('WORLD_SIZE', 1)), int(env.get('LOCAL_RANK', 0)))


@dataclass
class Drop:
    """A sample that a stage dropped, with the reason it is counted under."""

    reason: str
    key: str
    path: str = ''
    license: str = 'unknown'
    detail: str = ''


@dataclass
class UnitStats:
    """Counts of one unit; serialised as the unit's ``stats.json``."""

    stage: str
    unit: int
    seen: int = 0
    kept: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    dropped_samples: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def keep(self, license_id: str) -> None:
        self.seen += 1
        self.kept[license_id] = self.kept.get(license_id, 0) + 1

    def drop(self, drop: Drop) -> None:
        self.seen += 1
        by_license = self.dropped.setdefault(drop.reason, {})
        by_license[drop.license] = by_license.get(drop.license, 0) + 1
        self.dropped_samples.append(
            {'key': drop.key, 'path': drop.path, 'reason': drop.reason, 'license': drop.license, 'detail': drop.detail}
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# A unit's work: given the unit index, yield samples to write (dicts of MDS columns) or Drops.
UnitFunction = Callable[[int], Iterable['dict[str, Any] | Drop']]


class StageRunner:
    """Runs ``process(unit)`` for every unit of a stage into ``out`` and merges the result.

    Args:
        stage (str): Stage name, recorded in stats and ``pipeline.json``.
        out (str): Output folder or object-store URL.
        settings (dict): Everything that determines the stage's output (input, options). A rerun into the same
            folder must have the same settings, so finished units are never mixed with differently made ones.
        overwrite (bool): Start afresh, discarding finished units of an earlier run. Default: ``False``.
        compression (str, optional): MDS shard compression, e.g. ``'zstd'``. Default: ``None``.
        size_limit (str): MDS shard size limit. Default: ``'64mb'``.
        progress (bool): Show a progress bar per rank. Default: ``True``.
        barrier_timeout (float): Seconds a rank waits for the others before the merge. Default: 24 hours.
        columns (dict, optional): MDS columns of the output. Default: the image-caption columns (``MDS_COLUMNS``).
        side_columns (tuple, optional): Columns copied to each unit's ``samples.jsonl``. Default: ``SIDE_COLUMNS``.
        engine (str): ``'ranks'`` (this process is one rank of the launcher's) or ``'ray'``. Default: ``'ranks'``.
        address (str, optional): Ray cluster address (``'auto'``); ``None`` starts a local cluster. Default: ``None``.
        workers (int, optional): Ray actors (and concurrent tasks); ``None``: as many as the cluster has CPUs
            (GPUs for a stage whose work asks for GPUs). Default: ``None``.
    """

    def __init__(
        self,
        stage: str,
        out: str,
        settings: dict[str, Any],
        *,
        overwrite: bool = False,
        compression: Optional[str] = None,
        size_limit: str = '64mb',
        progress: bool = True,
        barrier_timeout: float = 24 * 3600,
        columns: Optional[dict[str, str]] = None,
        side_columns: Optional[tuple[str, ...]] = None,
        engine: str = 'ranks',
        address: Optional[str] = None,
        workers: Optional[int] = None,
    ):
        if engine not in ENGINES:
            raise ValueError(f'Unknown engine {engine!r}. Valid engines: {", ".join(ENGINES)}.')
        if workers is not None and workers < 1:
            raise ValueError(f'workers must be at least 1, got {workers}.')
        self.stage = stage
        self.engine = engine
        self.address = address
        self.workers = workers
        # One Ray driver schedules every unit: it is rank 0 of 1 whatever the launcher's environment says.
        self.ranks = rank_info() if engine == 'ranks' else RankInfo(0, 1, 0)
        self.scratch = tempfile.mkdtemp(prefix=f'pipeline-{stage}-rank{self.ranks.rank}-')
        self.root = out
        self.output = OutputDataset(out, self.scratch)
        self.settings = {'stage': stage, **settings, 'compression': compression, 'size_limit': size_limit}
        self.overwrite = overwrite
        self.compression = compression
        self.size_limit = size_limit
        self.progress = progress
        self.barrier_timeout = barrier_timeout
        self.columns = columns or MDS_COLUMNS
        self.side_columns = SIDE_COLUMNS if side_columns is None else side_columns

    def _init_distributed(self) -> None:
        if self.ranks.world_size > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group(
                'gloo',
                rank=self.ranks.rank,
                world_size=self.ranks.world_size,
                timeout=datetime.timedelta(seconds=self.barrier_timeout),
            )

    def _barrier(self) -> None:
        if self.ranks.world_size > 1:
            torch_dist.barrier()

    def _check_settings(self) -> None:
        """Rank 0 records the settings; a rerun with different ones must pass ``--overwrite``."""
        if self.ranks.rank == 0:
            previous = self.output.read_json('pipeline.json')
            if previous is not None and previous != self.settings and not self.overwrite:
                keys = set(previous) | set(self.settings)
                changed = sorted(k for k in keys if previous.get(k) != self.settings.get(k))
                raise ValueError(
                    f'{self.output.root} holds a {previous.get("stage")} run with other settings (differs in: '
                    f'{", ".join(changed)}). Use --overwrite to start afresh, or another output folder.'
                )
            if self.overwrite:
                self.output.clear()
            if previous != self.settings or self.overwrite:
                self.output.write_text('pipeline.json', json.dumps(self.settings, indent=2, sort_keys=True))
        self._barrier()

    def run(
        self,
        num_units: int,
        process: UnitFunction | UnitWork,
        unit_samples: Optional[Sequence[int]] = None,
        *,
        before_units: Optional[Callable[[StageRunner], Any]] = None,
    ) -> list[int]:
        """Process this rank's unfinished units, then merge all of them on rank 0; returns all unit indexes.

        ``process`` is ``process(unit)`` yielding samples, or a :class:`UnitWork`. The progress bar counts samples
        (kept or dropped) as ``process`` yields them; ``unit_samples``, the number of input samples of each unit when
        the stage knows it (an MDS shard's count), gives the bar its total. ``before_units(runner)`` runs after the
        settings check on every rank, e.g. global passes scheduled with :meth:`map_tasks`.
        """
        work = process if isinstance(process, UnitWork) else UnitWork(build=lambda: lambda unit, _: process(unit))
        self.num_units = num_units
        # The unit count is part of the settings: a grown input folder must not reuse units cut differently.
        self.settings['num_units'] = num_units
        self._init_distributed()
        try:
            self._check_settings()
            if before_units is not None:
                before_units(self)
            self._run_units(work, unit_samples)
            self._barrier()
            if self.ranks.rank == 0:
                missing = sorted(set(range(num_units)) - self.output.finished_units())
                if missing:
                    raise RuntimeError(f'Units {missing[:10]} of {self.output.root} did not finish; rerun to resume.')
                self.output.merge(list(range(num_units)))
            self._barrier()
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)
            if self.ranks.world_size > 1 and torch_dist.is_initialized():
                torch_dist.destroy_process_group()  # a live gloo group keeps the launcher waiting for the process
        return list(range(num_units))

    def map_tasks(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> None:
        """Run ``fn(item)`` for every item (items ``r, r + N, ...`` on rank ``r``, or as Ray tasks), then wait for all
        ranks. ``fn`` writes its result; this is how a stage runs global passes before its units."""
        if self.engine == 'ray':
            ray_map_tasks(fn, items, workers=self.workers, address=self.address)
        else:
            for item in items[self.ranks.rank :: self.ranks.world_size]:
                fn(item)
        self._barrier()

    def _run_units(self, work: UnitWork, unit_samples: Optional[Sequence[int]] = None) -> None:
        finished = set() if self.overwrite else self.output.finished_units()
        mine = [u for u in range(self.num_units) if u % self.ranks.world_size == self.ranks.rank]
        todo = [u for u in mine if u not in finished]
        if len(todo) < len(mine):
            print(
                f'[{self.stage} rank {self.ranks.rank}] skipping {len(mine) - len(todo)} finished units of {len(mine)}',
                file=sys.stderr,
            )
        if self.engine == 'ray':
            ray_run_units(self._for_worker(), todo, work, workers=self.workers, address=self.address)
            return
        process = work.build()
        # Samples, not units: a rank with one large unit (a shard) would otherwise sit at 0% until it is done.
        bar = tqdm(
            total=sum(unit_samples[u] for u in todo) if unit_samples is not None else None,
            desc=f'{self.stage} rank {self.ranks.rank}',
            unit='sample',
            position=self.ranks.local_rank,
            disable=not self.progress,
        )
        for unit in todo:
            self._run_unit(unit, lambda u: process(u, work.decode(u) if work.decode else None), bar.update)
        bar.close()

    def _for_worker(self) -> StageRunner:
        """A copy to ship to Ray workers: it makes its own scratch folder where it runs."""
        clone = copy.copy(self)
        clone.scratch = None
        clone.output = None
        return clone

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.scratch is None:  # unpickled in a Ray worker: scratch of its own, removed when the process ends
            self.scratch = tempfile.mkdtemp(prefix=f'pipeline-{self.stage}-worker-')
            atexit.register(shutil.rmtree, self.scratch, ignore_errors=True)
            self.output = OutputDataset(self.root, self.scratch)

    def _run_unit(self, unit: int, process: UnitFunction, progress: Callable[[int], Any] = lambda n: None) -> None:
        start = time.perf_counter()
        stats = UnitStats(self.stage, unit)
        side_lines = []
        name = self.output.unit_name(unit)
        writer = self.output.writer(unit, self.columns, compression=self.compression, size_limit=self.size_limit)
        with writer:
            for item in process(unit):
                progress(1)
                if isinstance(item, Drop):
                    stats.drop(item)
                    continue
                writer.write(item)
                stats.keep(item.get('license', 'unknown'))
                side_lines.append(json.dumps({k: item[k] for k in self.side_columns}))
        self.output.write_text(f'{name}/samples.jsonl', ''.join(line + '\n' for line in side_lines))
        stats.seconds = time.perf_counter() - start
        self.output.write_text(f'{name}/stats.json', json.dumps(stats.to_dict(), indent=1))

    def unit_stats(self, units: list[int]) -> Iterator[dict[str, Any]]:
        """Yield the ``stats.json`` of each unit, read as it is asked for: each lists its unit's dropped samples, so
        a list of all of them would grow with the dataset (about 350 bytes per dropped sample)."""
        for unit in units:
            yield self.output.read_json(f'{self.output.unit_name(unit)}/stats.json')
