"""Filter stage: license allowlist, minimum size, aspect ratio, exact and near duplicates.

The per-sample rules need only the side table (``samples.jsonl``) that every stage writes next to its shards, so
the decisions for the whole dataset are made before any image is read, in the dataset's global order, keeping the
first of each group of duplicates. :func:`decide` states the rule on an in-memory table; the stage makes the same
decisions with :mod:`diffusion.pipeline.dedup`'s partitioned passes, whose memory does not grow with the dataset,
scheduled by the stage's engine (ranks or Ray). The result is therefore the same for any number of workers.
Exact duplicates share a SHA-256 of the source bytes; near duplicates have 64-bit
perceptual hashes within ``near_duplicate_distance`` bits (a re-encode or a resize of the same photo).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Optional

from diffusion.data.licenses import allowed_licenses
from diffusion.pipeline.dedup import PARTITION_ROWS, BlockDecisions, plan_dedup, run_dedup
from diffusion.pipeline.engines import UnitWork
from diffusion.pipeline.images import NearDuplicateIndex
from diffusion.pipeline.runner import Drop, StageRunner
from diffusion.pipeline.shards import InputDataset, require_input

__all__ = ['FilterOptions', 'decide', 'filter_dataset', 'read_side_table', 'rule_drop']


@dataclass(frozen=True)
class FilterOptions:
    """Which samples are kept.

    Args:
        preset (str): License allowlist: ``'commercial'`` (no NC, no ND), ``'noncommercial'`` (no ND) or ``'all'``.
            Default: ``'commercial'``.
        min_side (int): Minimum shortest side of the original image. Default: ``512``.
        min_aspect (float, optional): Minimum width / height. Default: ``None``.
        max_aspect (float, optional): Maximum width / height. Default: ``None``.
        exact_duplicates (bool): Drop repeats of the same bytes. Default: ``True``.
        near_duplicate_distance (int, optional): Hamming distance of perceptual hashes under which an image is a
            near duplicate; ``None`` turns the check off. Default: ``4``.
    """

    preset: str = 'commercial'
    min_side: int = 512
    min_aspect: Optional[float] = None
    max_aspect: Optional[float] = None
    exact_duplicates: bool = True
    near_duplicate_distance: Optional[int] = 4


def read_side_table(dataset: InputDataset) -> list[dict[str, Any]]:
    """The ``samples.jsonl`` rows of every unit of ``dataset``, in the dataset's sample order."""
    units: list[str] = []
    for index in range(len(dataset)):
        unit = dataset.shard_file(index).split('/')[0]
        if not unit.startswith('unit-'):
            raise ValueError(f'{dataset.root} was not written by the pipeline (shards are not in unit folders).')
        if unit not in units:
            units.append(unit)
    rows: list[dict[str, Any]] = []
    for unit in units:
        try:
            rows += dataset.read_json_lines(f'{unit}/samples.jsonl')
        except FileNotFoundError as error:
            message = f'{dataset.root}/{unit} has no samples.jsonl; rerun the stage that wrote it.'
            raise FileNotFoundError(message) from error
    if len(rows) != dataset.num_samples:
        raise ValueError(f'{dataset.root}: samples.jsonl lists {len(rows)} samples, index.json {dataset.num_samples}.')
    return rows


def rule_drop(row: dict[str, Any], options: FilterOptions, allowed: Any) -> Optional[tuple[str, str]]:
    """``(reason, detail)`` when the per-sample rules (license, size, aspect) drop ``row``, else ``None``."""
    width, height = row['original_width'], row['original_height']
    if row['license'] not in allowed:
        return 'license_not_allowed', f'{row["license"]} is not in the {options.preset} preset'
    if min(width, height) < options.min_side:
        return 'too_small', f'{width}x{height} is under {options.min_side} on its short side'
    if (options.min_aspect and width / height < options.min_aspect) or (
        options.max_aspect and width / height > options.max_aspect
    ):
        return 'aspect_ratio', f'{width}x{height} aspect {width / height:.2f} is out of bounds'
    return None


def decide(rows: list[dict[str, Any]], options: FilterOptions) -> list[Optional[Drop]]:
    """For each row, ``None`` to keep it or the ``Drop`` that removes it (the rule, on an in-memory table)."""
    allowed = allowed_licenses(options.preset)
    near = None if options.near_duplicate_distance is None else NearDuplicateIndex(options.near_duplicate_distance)
    first_by_hash: dict[str, str] = {}
    decisions: list[Optional[Drop]] = []
    for row in rows:

        def drop(reason: str, detail: str) -> Drop:
            return Drop(reason, row['key'], row['key'], row['license'], detail)  # noqa: B023 (used at once)

        verdict = rule_drop(row, options, allowed)
        if verdict is not None:
            decisions.append(drop(*verdict))
        elif options.exact_duplicates and row['sha256'] in first_by_hash:
            decisions.append(drop('exact_duplicate', f'same bytes as {first_by_hash[row["sha256"]]}'))
        else:
            earlier = near.add(row['key'], int(row['phash'], 16)) if near is not None else None
            if earlier is not None:
                decisions.append(drop('near_duplicate', f'perceptual hash close to {earlier}'))
            else:
                first_by_hash.setdefault(row['sha256'], row['key'])
                decisions.append(None)
    return decisions


def filter_dataset(
    input_root: str,
    out: str,
    *,
    options: FilterOptions = FilterOptions(),
    partition_rows: int = PARTITION_ROWS,
    **runner_kwargs: Any,
) -> StageRunner:
    """Run the filter stage from the dataset at ``input_root`` into ``out``; one unit per input shard.

    ``partition_rows`` bounds the rows each global pass holds at once (see :mod:`diffusion.pipeline.dedup`).
    """
    allowed_licenses(options.preset)  # fail on a bad preset before reading anything
    require_input(input_root)
    runner = StageRunner('filter', out, {'input': input_root, **asdict(options)}, **runner_kwargs)
    dataset = InputDataset(input_root, runner.scratch)
    plan = plan_dedup(dataset, options.near_duplicate_distance, partition_rows)
    allowed = allowed_licenses(options.preset)

    def decide_globally(runner: StageRunner) -> None:
        if runner.output.finished_units() >= set(range(len(dataset))):
            return  # a rerun of a finished stage: nothing left to decide
        rules = partial(rule_drop, options=options, allowed=allowed)
        run_dedup(dataset, runner.output, plan, options, rules, runner.map_tasks)

    def build():
        decisions = BlockDecisions(runner.output, plan)  # the worker's own copy, one block in memory at a time

        def process(unit: int, _: Any):
            first = dataset.offsets[unit]
            for position, sample in enumerate(dataset.iter_shard(unit)):
                verdict = decisions.drop_of(first + position)
                yield sample if verdict is None else Drop(verdict[0], sample['key'], sample['key'], sample['license'],
                                                          verdict[1])  # fmt: skip

        return process

    runner.run(
        len(dataset),
        UnitWork(build=build),
        unit_samples=[shard['samples'] for shard in dataset.shards],
        before_units=decide_globally,
    )
    # Reached only when every unit finished (a crash keeps _work/ for the rerun to resume from); all ranks are past
    # the runner's last barrier, so none reads the decisions any more. One rank deletes, locally or on object storage.
    if runner.ranks.rank == 0:
        runner.output.remove_work()
    return runner
