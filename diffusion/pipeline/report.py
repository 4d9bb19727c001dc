"""Provenance report of a prepared dataset: what each stage kept and dropped, and who to credit for every image.

CommonCanvas is only usable if every training image can be traced to its Creative-Commons license and author, so
the pipeline's stages (ingest, filter, caption, ...) each return per-unit stats and this module sums them, checks
that no sample went missing (``seen == kept + dropped`` for every unit), and writes the files a model card ships:
``provenance.json`` / ``provenance.md`` (per-stage accounting), ``attribution.jsonl`` / ``ATTRIBUTION.txt`` (one
credit line per image) and ``license_mix.png`` (a matplotlib bar chart drawn with the Agg canvas, not pyplot, so no
global backend state is touched).

The report also records the fingerprint of the dataset it describes (:mod:`diffusion.data.fingerprint`: the final
stage output's location, the SHA-256 of its ``index.json`` and its sample count), the same entries a training run
records in its checkpoints, so that an export can check that a report describes the data its model trained on.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import IO, Any, Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from diffusion.data.fingerprint import fingerprint_index, format_stream
from diffusion.data.licenses import license_url
from diffusion.pipeline.shards import OutputDataset, is_remote

__all__ = ['aggregate_stage', 'report_outputs', 'write_report', 'MAX_LISTED_DROPS']

MAX_LISTED_DROPS = 50  # per stage in provenance.md; the full list stays in provenance.json


def _sorted_counts(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items()))


class StoredUnits:
    """The ``stats.json`` of a stage output's units, read from the output each time they are iterated, in unit
    order: a report over millions of units and dropped samples never holds them all in memory."""

    def __init__(self, output: OutputDataset, units: list[int]):
        self.output = output
        self.units = units

    def __len__(self) -> int:
        return len(self.units)

    def __iter__(self) -> Iterator[dict]:
        for unit in self.units:
            yield self.output.read_json(f'{self.output.unit_name(unit)}/stats.json')


class DroppedSamples:
    """The dropped samples of :class:`StoredUnits`, streamed again on each iteration; ``len`` and slices work."""

    def __init__(self, units: StoredUnits, count: int):
        self.units = units
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict]:
        for u in self.units:
            for sample in u.get('dropped_samples', []):
                yield {'unit': u['unit'], **sample}

    def __getitem__(self, index: slice) -> list[dict]:
        return list(itertools.islice(self, index.start, index.stop, index.step))


def aggregate_stage(units: list[dict] | StoredUnits, stage: Optional[str] = None) -> dict:
    """Sum one stage's per-unit stats and check that every unit accounted for each sample it read.

    Args:
        units: Stats dicts of one stage (``stage``, ``unit``, ``seen``, ``kept``, ``dropped``, ``dropped_samples``,
            ``seconds``), in any order.
        stage: The stage's name; taken from the units when not given (needed only when ``units`` is empty).

    Returns:
        ``{'stage', 'units', 'seen', 'kept': {license: n}, 'dropped': {reason: {license: n}}, 'kept_total',
        'dropped_total', 'dropped_by_reason': {reason: n}, 'dropped_samples', 'seconds'}``; each dropped sample
        gains the ``unit`` it came from and they are ordered by unit, then as the unit listed them.

    Raises:
        ValueError: If a unit's ``seen`` differs from its kept plus dropped counts, or units disagree on the stage.
    """
    if stage is None:
        stage = next(iter(units), {}).get('stage', '')
    name = stage
    kept: Counter[str] = Counter()
    dropped: dict[str, Counter[str]] = {}
    seen = 0
    seconds = 0.0
    listed = 0
    for u in units:
        listed += len(u.get('dropped_samples', []))
        if u['stage'] != name:
            raise ValueError(f'stage {name!r}: unit {u["unit"]} reports stage {u["stage"]!r}')
        unit_kept = sum(u['kept'].values())
        unit_dropped = sum(n for by_license in u['dropped'].values() for n in by_license.values())
        if u['seen'] != unit_kept + unit_dropped:
            # A sample that is neither kept nor dropped is one whose license nobody checked: refuse to report it.
            raise ValueError(
                f'stage {name!r}, unit {u["unit"]}: seen={u["seen"]} but kept={unit_kept} + dropped={unit_dropped}'
                f' = {unit_kept + unit_dropped}'
            )
        seen += u['seen']
        seconds += float(u.get('seconds', 0.0))
        kept.update(u['kept'])
        for reason, by_license in u['dropped'].items():
            dropped.setdefault(reason, Counter()).update(by_license)
    if isinstance(units, StoredUnits):
        samples: Any = DroppedSamples(units, listed)  # streamed where they are written, never all in memory
    else:
        ordered = sorted(units, key=lambda u: u['unit'])  # stable: ties keep the caller's order
        samples = [{'unit': u['unit'], **s} for u in ordered for s in u.get('dropped_samples', [])]
    by_reason = {reason: sum(c.values()) for reason, c in sorted(dropped.items())}
    return {
        'stage': name,
        'units': len(units),
        'seen': seen,
        'kept': _sorted_counts(kept),
        'dropped': {reason: _sorted_counts(c) for reason, c in sorted(dropped.items())},
        'kept_total': sum(kept.values()),
        'dropped_total': sum(by_reason.values()),
        'dropped_by_reason': by_reason,
        'dropped_samples': samples,
        'seconds': seconds,
    }


@contextlib.contextmanager
def _atomic_write(path: str) -> Iterator[IO[str]]:
    """Open ``path.tmp`` for writing and move it onto ``path`` only on success: no half-written report survives."""
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'w', encoding='utf-8') as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _one_line(text: Any) -> str:
    # Titles and author names come from scraped metadata: a newline in one would split an attribution in two.
    return re.sub(r'\s+', ' ', str(text)).strip()


def _md_cell(text: Any) -> str:
    return _one_line(text).replace('|', '\\|')


def _write_attributions(manifest: Iterable[dict], out_dir: str) -> Counter[str]:
    """Stream the manifest into attribution.jsonl and ATTRIBUTION.txt; returns images per license."""
    licenses: Counter[str] = Counter()
    urls: dict[str, str] = {}  # millions of rows share a handful of licenses
    jsonl_path = os.path.join(out_dir, 'attribution.jsonl')
    txt_path = os.path.join(out_dir, 'ATTRIBUTION.txt')
    with _atomic_write(jsonl_path) as jsonl, _atomic_write(txt_path) as txt:
        for row in manifest:
            lic = row['license']
            if lic not in urls:
                urls[lic] = license_url(lic)
            record = {
                'key': row['key'],
                'source_url': row['source_url'],
                'attribution': row['attribution'],
                'license': lic,
                'license_url': urls[lic],
                'title': row.get('title') or '',
            }
            jsonl.write(json.dumps(record, ensure_ascii=False) + '\n')
            name = _one_line(record['title']) or _one_line(record['key'])
            deed = f' ({urls[lic]})' if urls[lic] else ''
            txt.write(f'{name} by {_one_line(record["attribution"])}, {lic}{deed}, {_one_line(row["source_url"])}\n')
            licenses[lic] += 1
    return licenses


def _plot_license_mix(licenses: dict[str, int], path: str) -> None:
    """Horizontal bar chart of images per license, largest on top, counts on the bars."""
    items = sorted(licenses.items(), key=lambda kv: (kv[1], kv[0]))  # barh draws bottom-up
    total = sum(licenses.values())
    fig = Figure(figsize=(8, max(2.5, 0.45 * len(items) + 1.5)), dpi=100, layout='constrained')
    FigureCanvasAgg(fig)  # attach the Agg canvas to this figure only; pyplot's global backend is left alone
    ax = fig.add_subplot()
    if items:
        bars = ax.barh([k for k, _ in items], [v for _, v in items], color='tab:blue')
        ax.bar_label(bars, labels=[f'{v:,}' for _, v in items], padding=3, fontsize=9)
        ax.set_xlim(0, max(v for _, v in items) * 1.15)  # room for the labels of the longest bar
    else:
        ax.text(0.5, 0.5, 'no images', ha='center', va='center', transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlabel('images')
    ax.set_title(f'Images per license (total {total:,})')
    tmp = f'{path}.tmp.png'
    fig.savefig(tmp, dpi=100, format='png')
    os.replace(tmp, path)  # never leave a truncated PNG behind a crash


def _stage_markdown(agg: dict) -> list[str]:
    reasons = list(agg['dropped_by_reason'])
    licenses = sorted(set(agg['kept']) | {lic for c in agg['dropped'].values() for lic in c})
    lines = [
        f'## Stage `{agg["stage"]}`',
        '',
        f'{agg["units"]} units, {agg["seen"]:,} samples seen, {agg["kept_total"]:,} kept, '
        f'{agg["dropped_total"]:,} dropped, {agg["seconds"]:.1f} s.',
        '',
        '| license | kept | ' + ''.join(f'{_md_cell(r)} | ' for r in reasons) + 'seen |',
        '|---|---:|' + '---:|' * len(reasons) + '---:|',
    ]
    for lic in licenses:
        drops = [agg['dropped'][r].get(lic, 0) for r in reasons]
        row = [_md_cell(lic), agg['kept'].get(lic, 0), *drops, agg['kept'].get(lic, 0) + sum(drops)]
        lines.append('| ' + ' | '.join(str(c) for c in row) + ' |')
    totals = ['**total**', agg['kept_total'], *agg['dropped_by_reason'].values(), agg['seen']]
    lines += ['| ' + ' | '.join(str(c) for c in totals) + ' |', '']
    samples = agg['dropped_samples']
    if samples:
        lines += ['### Dropped samples', '']
        for s in samples[:MAX_LISTED_DROPS]:
            where = s.get('path') or s.get('key', '?')
            detail = f': {_one_line(s["detail"])}' if s.get('detail') else ''
            lines.append(f'- `{_one_line(where)}` ({s.get("license", "unknown")}): **{s.get("reason", "?")}**{detail}')
        if len(samples) > MAX_LISTED_DROPS:
            lines.append(f'- ... {len(samples) - MAX_LISTED_DROPS} more omitted (all are in provenance.json)')
        lines.append('')
    return lines


def write_report(
    stages: dict[str, list[dict]],
    manifest: Iterable[dict],
    out_dir: str,
    *,
    title: str = 'Provenance report',
    fingerprint: Optional[list[dict[str, Any]]] = None,
) -> dict:
    """Write the dataset's provenance report into ``out_dir``.

    Args:
        stages: Stage name -> that stage's unit stats, in pipeline order.
        manifest: One row per image of the final dataset (``key``, ``source_url``, ``attribution``, ``license``,
            ``title``); read once, as a stream, so it may be a generator over millions of rows.
        out_dir: Folder for ``provenance.json``, ``provenance.md``, ``attribution.jsonl``, ``ATTRIBUTION.txt`` and
            ``license_mix.png``; created if missing.
        title: Heading of the report.
        fingerprint: The fingerprint of the final dataset (one entry per stream, see
            :mod:`diffusion.data.fingerprint`), recorded as ``final.fingerprint``.

    Returns:
        The contents of ``provenance.json``: ``{'title', 'stages': [aggregate per stage], 'final': {'images',
        'licenses', 'fingerprint' (when given)}}``.

    Raises:
        ValueError: If any unit's counts do not add up (see :func:`aggregate_stage`).
    """
    os.makedirs(out_dir, exist_ok=True)
    # Aggregate first: a stage whose counts do not add up must fail before any file is written.
    aggregates = [aggregate_stage(units, stage=name) for name, units in stages.items()]
    licenses = _write_attributions(manifest, out_dir)
    final_licenses = dict(sorted(licenses.items(), key=lambda kv: (-kv[1], kv[0])))
    report = {
        'title': title,
        'stages': aggregates,
        'final': {'images': sum(licenses.values()), 'licenses': final_licenses},
    }
    if fingerprint is not None:
        report['final']['fingerprint'] = [dict(entry) for entry in fingerprint]
    with _atomic_write(os.path.join(out_dir, 'provenance.json')) as f:
        _dump_streaming(report, f)
    _plot_license_mix(final_licenses, os.path.join(out_dir, 'license_mix.png'))

    total = report['final']['images']
    md = [f'# {title}', '', f'**{total:,} images** in the final dataset.', '', '![license mix](license_mix.png)', '']
    md += ['| license | images |', '|---|---:|']
    md += [f'| {_md_cell(lic)} | {n} |' for lic, n in final_licenses.items()]
    md += [f'| **total** | {total} |', '']
    if fingerprint is not None:
        streams = '; '.join(f'`{_one_line(e["location"])}` ({format_stream(e)})' for e in fingerprint)
        md += [f'Dataset fingerprint: {streams}.', '']
    for agg in aggregates:
        md += _stage_markdown(agg)
    md += [
        'Per-image credits (title, author, license and source of every image): see `ATTRIBUTION.txt` and '
        '`attribution.jsonl`; the full list of dropped samples is in `provenance.json`.',
    ]
    with _atomic_write(os.path.join(out_dir, 'provenance.md')) as f:
        f.write('\n'.join(md) + '\n')
    return report


def _dump_streaming(report: dict, f: IO[str]) -> None:
    """``json.dump(report, f, indent=2)``, writing each stage's dropped samples one at a time as they are read."""
    samples = [agg['dropped_samples'] for agg in report['stages']]
    placeholders = {**report, 'stages': [{**agg, 'dropped_samples': f'@@dropped-{i}@@'} for i, agg in
                                         enumerate(report['stages'])]}  # fmt: skip
    text = json.dumps(placeholders, indent=2, ensure_ascii=False)
    for index, stage_samples in enumerate(samples):
        before, text = text.split(f'"@@dropped-{index}@@"', 1)
        f.write(before)
        indent = before[before.rfind('\n') + 1 :] if '\n' in before else ''
        indent = ' ' * (len(indent) - len(indent.lstrip(' ')))
        first = True
        f.write('[')
        for sample in stage_samples:
            f.write(('\n' if first else ',\n') + indent + '  ' + json.dumps(sample, ensure_ascii=False))
            first = False
        f.write(']' if first else '\n' + indent + ']')
    f.write(text + '\n')


def report_outputs(stage_roots: list[str], out_dir: str, *, title: str = 'Provenance report') -> dict:
    """Write the report of the pipeline outputs ``stage_roots`` (in pipeline order; local or object storage).

    Reads each output's ``pipeline.json`` (the stage name) and its units' ``stats.json``; the manifest is the
    ``samples.jsonl`` side table of the last output, which is the final dataset, and the report's fingerprint is
    that of the last output's ``index.json`` (the dataset a run trains on).
    """
    stages: dict[str, list[dict]] = {}
    outputs = []
    for root in stage_roots:
        if not is_remote(root) and not os.path.isdir(root):
            raise FileNotFoundError(f'Stage output {root} does not exist.')
        output = OutputDataset(root, os.path.join(out_dir, '.download', str(len(outputs))))
        settings = output.read_json('pipeline.json')
        if settings is None:
            raise FileNotFoundError(f'{root} has no pipeline.json: it is not the output of a pipeline stage.')
        units = sorted(output.finished_units())
        name = settings['stage'] if settings['stage'] not in stages else f'{settings["stage"]} ({root})'
        stages[name] = StoredUnits(output, units)  # type: ignore[assignment]
        outputs.append((output, units))
    final, units = outputs[-1]
    try:
        with open(final.fetch('index.json'), 'rb') as f:
            fingerprint = [fingerprint_index(stage_roots[-1], f.read())]
    except FileNotFoundError:
        raise FileNotFoundError(
            f'{stage_roots[-1]} has no index.json: its stage has not finished, so there is no dataset to report on.'
        ) from None

    def manifest() -> Iterator[dict]:
        for unit in units:
            with open(final.fetch(f'{final.unit_name(unit)}/samples.jsonl'), encoding='utf-8') as f:
                yield from (json.loads(line) for line in f)

    report = write_report(stages, manifest(), out_dir, title=title, fingerprint=fingerprint)
    shutil.rmtree(os.path.join(out_dir, '.download'), ignore_errors=True)
    return report
