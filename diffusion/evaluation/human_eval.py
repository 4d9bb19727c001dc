"""A pairwise human preference study between two folders of samples, as a small local web app.

``python -m diffusion.evaluation.human_eval serve --a runs/model_a/samples --b runs/model_b/samples`` shows raters
the two models' images for the same prompt side by side, in a random left/right order that is stored per rater and
pair, so a vote for "left" maps back to model A or B and the page never says which side is which. Raters vote with
buttons or the keyboard (left arrow or 1, right arrow or 2, down arrow, space or 0 for a tie); several raters can vote
at once, each sees every pair at most once, and every vote is committed to SQLite before the page answers, so stopping
or killing the server loses nothing. ``/results`` (HTML), ``/results.json`` and the ``report`` subcommand give the
win rate of A over B, where a tie counts as half a win for each model, with a 95% Wilson score interval over votes
and, because votes on the same prompt are correlated, a percentile bootstrap interval over prompts.

Images are paired by ``(prompt_index, seed)`` from the ``samples.jsonl`` that ``python -m diffusion.inference.sample``
writes, by ``(prompt, seed)`` when the two folders index the prompts differently, and by file name when a folder has
no ``samples.jsonl``.

Built on Flask (routes, Jinja templates in ``human_eval_static/``), Werkzeug's threaded server, the standard
library's ``sqlite3`` (WAL journal) and NumPy (bootstrap).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
import sqlite3
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Optional

import numpy as np

from diffusion.evaluation.sample_folder import CONTACT_SHEET, SAMPLE_NAME, SAMPLES_FILE, read_samples_file

__all__ = [
    'Pair',
    'VoteStore',
    'bootstrap_prompt_interval',
    'create_app',
    'default_db_path',
    'format_report',
    'load_results',
    'load_samples',
    'main',
    'pair_folders',
    'summarize_votes',
    'wilson_interval',
]

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'human_eval_static')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp')
_RATER_NAME = re.compile(r'^[\w .@-]{1,64}$')
RATER_COOKIE = 'rater'
CHOICES = ('left', 'right', 'tie')
TIE_CONVENTION = 'a tie counts as half a win for each model'
DEFAULT_QUESTION = 'Which image is better for this prompt?'


@dataclass(frozen=True)
class Pair:
    """Two images, one per model, for the same prompt and seed.

    Args:
        pair_id (str): Stable id of the pair (a hash of both file names), the same after a restart.
        file_a (str): File name inside folder A.
        file_b (str): File name inside folder B.
        prompt (str): The prompt, or ``prompt <index>`` / the file name when the folders do not record it.
        prompt_index (int, optional): Index of the prompt in A's prompt list, when known.
        seed (int, optional): Sampling seed, when known.
    """

    pair_id: str
    file_a: str
    file_b: str
    prompt: str
    prompt_index: Optional[int] = None
    seed: Optional[int] = None


def _image_path(folder: str, name: Any) -> str:
    """``folder/name``, refusing names that are absolute or lead outside ``folder`` (``../``, symlinks)."""
    root = os.path.realpath(folder)
    if not isinstance(name, str) or not name or os.path.isabs(name):
        raise ValueError(f'Image name {name!r} in {folder!r} is not a relative file name; refused.')
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root or path == root:
        raise ValueError(f'Image name {name!r} in {folder!r} points outside the folder; refused.')
    return path


def load_samples(folder: str) -> list[dict]:
    """Rows describing the images of one sample folder.

    Reads ``samples.jsonl`` when the folder has one (rows with at least ``file``; the sampling CLI also writes
    ``prompt_index``, ``prompt`` and ``seed``), otherwise lists the image files (``contact_sheet.png`` excluded) and
    reads ``prompt_index`` and ``seed`` from names like ``00003_42.png``.

    Args:
        folder (str): The sample folder.

    Returns:
        list[dict]: One row per existing image, ordered by file name.

    Raises:
        FileNotFoundError: When ``folder`` is not a folder.
        ValueError: When it holds no images, or ``samples.jsonl`` is malformed or names a file outside the folder.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'Sample folder {folder!r} does not exist or is not a folder.')
    jsonl = os.path.join(folder, SAMPLES_FILE)
    rows: dict[str, dict] = {}
    if os.path.isfile(jsonl):
        missing = 0
        for row in read_samples_file(jsonl):
            if os.path.isfile(_image_path(folder, row['file'])):
                rows[row['file']] = row  # a resumed sampling run may list a file twice: keep the last row
            else:
                missing += 1
        if missing:
            warnings.warn(f'{missing} image(s) listed in {jsonl} are missing; they are left out.', stacklevel=2)
    else:
        for name in os.listdir(folder):
            if name == CONTACT_SHEET or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            match = SAMPLE_NAME.match(name)
            rows[name] = (
                {'file': name, 'prompt_index': int(match[1]), 'seed': int(match[2])} if match else {'file': name}
            )
    if not rows:
        raise ValueError(
            f'Sample folder {folder!r} holds no images (looked for {SAMPLES_FILE} rows, else '
            f'{"/".join(IMAGE_EXTENSIONS)} files).'
        )
    return [rows[name] for name in sorted(rows)]


def _keys_by_index(rows: Sequence[dict]) -> dict:
    return {(row['prompt_index'], row.get('seed')): row for row in rows}


def _keys_by_prompt(rows: Sequence[dict]) -> dict:
    """``(prompt, seed, occurrence)``: a prompt listed twice pairs its first copy with the other folder's first."""
    keys, seen = {}, {}
    for row in sorted(rows, key=lambda row: (row.get('prompt_index') or 0, str(row.get('seed')), row['file'])):
        base = (row['prompt'], row.get('seed'))
        seen[base] = seen.get(base, -1) + 1
        keys[(*base, seen[base])] = row
    return keys


def _match_rows(rows_a: Sequence[dict], rows_b: Sequence[dict]) -> tuple[str, dict, dict]:
    """The pairing rule both folders support, and each folder's rows keyed by it."""
    has_index = all(isinstance(row.get('prompt_index'), int) for row in (*rows_a, *rows_b))
    has_prompt = all(isinstance(row.get('prompt'), str) for row in (*rows_a, *rows_b))
    if has_index:
        keys_a, keys_b = _keys_by_index(rows_a), _keys_by_index(rows_b)
        # The same index naming different prompts means the folders were sampled from different prompt lists.
        prompts = [(keys_a[key].get('prompt'), keys_b[key].get('prompt')) for key in keys_a.keys() & keys_b.keys()]
        if not any(None not in both and both[0] != both[1] for both in prompts):
            return '(prompt_index, seed)', keys_a, keys_b
    if has_prompt:
        return '(prompt, seed)', _keys_by_prompt(rows_a), _keys_by_prompt(rows_b)
    return 'file name', {row['file']: row for row in rows_a}, {row['file']: row for row in rows_b}


def pair_folders(dir_a: str, dir_b: str) -> list[Pair]:
    """Pairs of images of the same prompt and seed from two sample folders.

    Pairs by ``(prompt_index, seed)``; by ``(prompt, seed)`` when both folders record prompt texts and the indices
    disagree about them; by file name otherwise. Warns with counts when images have no counterpart.

    Args:
        dir_a (str): Samples of model A.
        dir_b (str): Samples of model B.

    Returns:
        list[Pair]: The pairs, ordered by prompt index, seed and file name.

    Raises:
        FileNotFoundError: When a folder is missing.
        ValueError: When a folder has no images, or the two share no pair.
    """
    rows_a, rows_b = load_samples(dir_a), load_samples(dir_b)
    rule, keys_a, keys_b = _match_rows(rows_a, rows_b)
    pairs = []
    for key in keys_a.keys() & keys_b.keys():
        row_a, row_b = keys_a[key], keys_b[key]
        index = row_a.get('prompt_index') if isinstance(row_a.get('prompt_index'), int) else None
        prompt = (
            row_a.get('prompt') or row_b.get('prompt') or (f'prompt {index}' if index is not None else row_a['file'])
        )
        pair_id = hashlib.sha1(f'{row_a["file"]}\0{row_b["file"]}'.encode()).hexdigest()[:16]
        pairs.append(Pair(pair_id, row_a['file'], row_b['file'], prompt, index, row_a.get('seed')))
    if not pairs:
        raise ValueError(
            f'Sample folders {dir_a!r} ({len(rows_a)} images) and {dir_b!r} ({len(rows_b)} images) share no pair of '
            f'images when matched by {rule}: sample both with the same prompts and seeds.'
        )
    unpaired_a, unpaired_b = len(rows_a) - len(pairs), len(rows_b) - len(pairs)
    if unpaired_a or unpaired_b:
        warnings.warn(
            f'Paired {len(pairs)} images by {rule}; {unpaired_a} image(s) in {dir_a!r} and {unpaired_b} in {dir_b!r} '
            'have no counterpart and are left out of the study.',
            stacklevel=2,
        )
    return sorted(
        pairs, key=lambda pair: (pair.prompt_index is None, pair.prompt_index or 0, str(pair.seed), pair.file_a)
    )


_SCHEMA = """
CREATE TABLE IF NOT EXISTS study (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shown (
    rater TEXT NOT NULL, pair_id TEXT NOT NULL, left_side TEXT NOT NULL CHECK (left_side IN ('a', 'b')),
    shown_at REAL NOT NULL, PRIMARY KEY (rater, pair_id));
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rater TEXT NOT NULL, pair_id TEXT NOT NULL, prompt TEXT NOT NULL,
    prompt_index INTEGER, seed INTEGER, file_a TEXT NOT NULL, file_b TEXT NOT NULL, left_side TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie')), created_at REAL NOT NULL, UNIQUE (rater, pair_id));
"""


class VoteStore:
    """The study's SQLite database: study metadata, the left/right order shown to each rater, and the votes.

    Every method opens its own connection and commits before returning, so the store is safe to use from the
    server's threads and a killed server loses no answered vote.

    Args:
        path (str): Database file; created with its folder when missing.
    """

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as connection:
            connection.execute('PRAGMA journal_mode=WAL')  # readers never block the writer
            connection.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            connection.execute('PRAGMA synchronous=FULL')  # a committed vote survives a crash of the machine too
            connection.execute('BEGIN IMMEDIATE')  # one writer at a time: read-then-insert cannot interleave
            yield connection
            connection.execute('COMMIT')
        except BaseException:
            if connection.in_transaction:
                connection.execute('ROLLBACK')
            raise
        finally:
            connection.close()

    def study(self) -> dict[str, str]:
        """The stored study metadata (``dir_a``, ``dir_b``, ``name_a``, ``name_b``)."""
        with self._transaction() as connection:
            return dict(connection.execute('SELECT key, value FROM study'))

    def bind_study(self, dir_a: str, dir_b: str, name_a: str, name_b: str) -> None:
        """Records which folders are A and B; refuses a database that holds another study (or A and B swapped)."""
        dirs = {'dir_a': os.path.abspath(dir_a), 'dir_b': os.path.abspath(dir_b)}
        with self._transaction() as connection:
            stored = dict(connection.execute('SELECT key, value FROM study'))
            if 'dir_a' in stored and (stored['dir_a'], stored['dir_b']) != (dirs['dir_a'], dirs['dir_b']):
                raise ValueError(
                    f'Database {self.path!r} holds the study A={stored["dir_a"]!r} vs B={stored["dir_b"]!r}, not '
                    f'A={dirs["dir_a"]!r} vs B={dirs["dir_b"]!r}; pass another --db for a new study.'
                )
            values = {**dirs, 'name_a': name_a, 'name_b': name_b}
            connection.executemany('INSERT OR REPLACE INTO study VALUES (?, ?)', values.items())

    def next_pair(self, rater: str, pairs: Sequence[Pair], rng: random.Random) -> Optional[tuple[Pair, str]]:
        """The pair to show ``rater`` and the side (``'a'`` or ``'b'``) on the left, or ``None`` when all are rated.

        A pair shown but not yet rated comes back in the same order (a reload cannot reshuffle it); otherwise a random
        unseen pair gets a random order, recorded before it is shown.
        """
        with self._transaction() as connection:
            voted = {row[0] for row in connection.execute('SELECT pair_id FROM votes WHERE rater = ?', (rater,))}
            shown = dict(
                connection.execute('SELECT pair_id, left_side FROM shown WHERE rater = ? ORDER BY shown_at', (rater,))
            )
            by_id = {pair.pair_id: pair for pair in pairs}
            pending = [pair_id for pair_id in shown if pair_id in by_id and pair_id not in voted]
            if pending:
                return by_id[pending[0]], shown[pending[0]]
            unseen = [pair for pair in pairs if pair.pair_id not in voted and pair.pair_id not in shown]
            if not unseen:
                return None
            pair, left_side = rng.choice(unseen), rng.choice('ab')
            connection.execute('INSERT INTO shown VALUES (?, ?, ?, ?)', (rater, pair.pair_id, left_side, time.time()))
            return pair, left_side

    def left_side(self, rater: str, pair_id: str) -> Optional[str]:
        """Which model (``'a'`` or ``'b'``) was shown on the left of ``pair_id`` to ``rater``, if it was shown."""
        with self._transaction() as connection:
            return _left_side(connection, rater, pair_id)

    def record_vote(self, rater: str, pair: Pair, choice: str) -> Optional[str]:
        """Stores ``rater``'s ``choice`` (``'left'``, ``'right'`` or ``'tie'``) as ``'a'``, ``'b'`` or ``'tie'``.

        Returns:
            The stored choice, or ``None`` when the rater had already voted on this pair (the first vote stays).

        Raises:
            ValueError: When ``choice`` is unknown.
            LookupError: When the pair was never shown to the rater, so no left/right order exists.
        """
        if choice not in CHOICES:
            raise ValueError(f'Unknown choice {choice!r}; valid: {", ".join(CHOICES)}.')
        with self._transaction() as connection:
            left = _left_side(connection, rater, pair.pair_id)
            if left is None:
                raise LookupError(f'Pair {pair.pair_id} was never shown to rater {rater!r}.')
            stored = {'left': left, 'right': 'b' if left == 'a' else 'a', 'tie': 'tie'}[choice]
            cursor = connection.execute(
                'INSERT OR IGNORE INTO votes (rater, pair_id, prompt, prompt_index, seed, file_a, file_b, left_side, '
                'choice, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
                (rater, pair.pair_id, pair.prompt, pair.prompt_index, pair.seed, pair.file_a, pair.file_b)
                + (left, stored, time.time()),
            )
        return stored if cursor.rowcount else None

    def votes(self) -> list[dict]:
        """Every vote as a dict of the ``votes`` columns, oldest first."""
        with self._transaction() as connection:
            connection.row_factory = sqlite3.Row
            return [dict(row) for row in connection.execute('SELECT * FROM votes ORDER BY id')]

    def count_votes(self, rater: str) -> int:
        with self._transaction() as connection:
            return connection.execute('SELECT COUNT(*) FROM votes WHERE rater = ?', (rater,)).fetchone()[0]


def _left_side(connection: sqlite3.Connection, rater: str, pair_id: str) -> Optional[str]:
    query = 'SELECT left_side FROM shown WHERE rater = ? AND pair_id = ?'
    return next((row[0] for row in connection.execute(query, (rater, pair_id))), None)


def wilson_interval(successes: float, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / total`` (``successes`` may be fractional: half ties).

    Args:
        successes (float): Number of successes, ``0 <= successes <= total``.
        total (int): Number of trials, positive.
        confidence (float, optional): Coverage of the interval. Default: ``0.95``.
    """
    if total <= 0 or not 0 <= successes <= total:
        raise ValueError(f'Need 0 <= successes <= total and total > 0; got successes={successes}, total={total}.')
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    proportion = successes / total
    denominator = 1 + z * z / total
    center = (proportion + z * z / (2 * total)) / denominator
    half_width = z * math.sqrt(proportion * (1 - proportion) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, center - half_width), min(1.0, center + half_width)


def bootstrap_prompt_interval(
    scores: Sequence[float], counts: Sequence[int], samples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> Optional[tuple[float, float]]:
    """Percentile bootstrap interval of the win rate, resampling prompts (with all their votes) with replacement.

    Args:
        scores (Sequence[float]): Per prompt, the summed vote scores for A (1 win, 0.5 tie, 0 loss).
        counts (Sequence[int]): Per prompt, the number of votes.
        samples (int, optional): Bootstrap resamples. Default: ``2000``.
        confidence (float, optional): Coverage. Default: ``0.95``.
        seed (int, optional): Seed of the resampling, so reports are reproducible. Default: ``0``.

    Returns:
        The interval, or ``None`` with fewer than two prompts (nothing to resample).
    """
    scores_array, counts_array = np.asarray(scores, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    if len(scores_array) < 2:
        return None
    rng = np.random.default_rng(seed)
    rates = []
    for start in range(0, samples, 256):  # chunks bound the (resamples x prompts) index array
        index = rng.integers(0, len(scores_array), size=(min(256, samples - start), len(scores_array)))
        rates.append(scores_array[index].sum(axis=1) / counts_array[index].sum(axis=1))
    low, high = np.quantile(np.concatenate(rates), [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def _tally(votes: Sequence[Mapping]) -> dict[str, Any]:
    wins_a = sum(vote['choice'] == 'a' for vote in votes)
    wins_b = sum(vote['choice'] == 'b' for vote in votes)
    ties = len(votes) - wins_a - wins_b
    score = wins_a + ties / 2
    return {
        'num_votes': len(votes),
        'wins_a': wins_a,
        'wins_b': wins_b,
        'ties': ties,
        'win_rate_a': score / len(votes) if votes else None,
        'ci95': list(wilson_interval(score, len(votes))) if votes else None,
    }


def summarize_votes(votes: Iterable[Mapping], name_a: str = 'A', name_b: str = 'B') -> dict[str, Any]:
    """Win rate of A over B with 95% intervals, per-prompt and per-rater counts.

    Args:
        votes (Iterable[Mapping]): Rows with ``choice`` (``'a'``, ``'b'`` or ``'tie'``), ``prompt``, ``rater`` and
            optionally ``prompt_index``, as :meth:`VoteStore.votes` returns them.
        name_a (str, optional): Label of model A. Default: ``'A'``.
        name_b (str, optional): Label of model B. Default: ``'B'``.

    Returns:
        dict: ``win_rate_a`` (ties count half), ``ci95`` (Wilson score interval over votes),
        ``ci95_bootstrap_prompts`` (percentile bootstrap over prompts, ``None`` below two prompts), the counts, a
        ``per_prompt`` list and ``votes_per_rater``; rates and intervals are ``None`` without votes.
    """
    votes = list(votes)
    by_prompt: dict[str, list[Mapping]] = {}
    for vote in votes:
        by_prompt.setdefault(vote['prompt'], []).append(vote)
    per_prompt = [
        {'prompt': prompt, 'prompt_index': rows[0].get('prompt_index'), **_tally(rows)}
        for prompt, rows in by_prompt.items()
    ]
    per_prompt.sort(key=lambda row: (row['prompt_index'] is None, row['prompt_index'] or 0, row['prompt']))
    raters: dict[str, int] = {}
    for vote in votes:
        raters[vote['rater']] = raters.get(vote['rater'], 0) + 1
    return {
        'model_a': name_a,
        'model_b': name_b,
        **_tally(votes),
        'ci95_bootstrap_prompts': bootstrap_prompt_interval(
            [row['wins_a'] + row['ties'] / 2 for row in per_prompt], [row['num_votes'] for row in per_prompt]
        ),
        'tie_convention': TIE_CONVENTION,
        'ci_method': 'Wilson score interval over votes (95%)',
        'bootstrap_method': 'percentile bootstrap over prompts (95%, 2000 resamples, seed 0)',
        'num_prompts': len(per_prompt),
        'num_raters': len(raters),
        'votes_per_rater': dict(sorted(raters.items())),
        'per_prompt': per_prompt,
    }


def load_results(db_path: str) -> dict[str, Any]:
    """:func:`summarize_votes` of the votes in a study database, with the model names stored in it."""
    if not os.path.isfile(db_path):
        raise FileNotFoundError(f'Study database {db_path!r} does not exist.')
    store = VoteStore(db_path)
    study = store.study()
    return summarize_votes(store.votes(), study.get('name_a', 'A'), study.get('name_b', 'B'))


def _percent(value: Optional[float]) -> str:
    return '-' if value is None else f'{100 * value:.1f}%'


def _interval(interval: Optional[Sequence[float]]) -> str:
    return '-' if interval is None else f'[{_percent(interval[0])}, {_percent(interval[1])}]'


def format_report(results: Mapping[str, Any]) -> str:
    """The results of :func:`summarize_votes` as a plain-text table."""
    lines = [
        f'Human preference study: A = {results["model_a"]}, B = {results["model_b"]}',
        f'{results["num_votes"]} votes by {results["num_raters"]} rater(s) on {results["num_prompts"]} prompt(s): '
        f'A wins {results["wins_a"]}, B wins {results["wins_b"]}, ties {results["ties"]}',
        f'Win rate of A over B: {_percent(results["win_rate_a"])} ({results["tie_convention"]})',
        f'  95% CI {_interval(results["ci95"])} (Wilson score interval over votes)',
        f'  95% CI {_interval(results["ci95_bootstrap_prompts"])} (bootstrap over prompts)',
        '',
        f'{"votes":>5} {"A":>4} {"B":>4} {"tie":>4} {"A rate":>7}  prompt',
    ]
    for row in results['per_prompt']:
        lines.append(
            f'{row["num_votes"]:>5} {row["wins_a"]:>4} {row["wins_b"]:>4} {row["ties"]:>4} '
            f'{_percent(row["win_rate_a"]):>7}  {row["prompt"]}'
        )
    return '\n'.join(lines)


def default_db_path(dir_a: str, dir_b: str) -> str:
    """``<parent of dir_a>/human_eval_<A folder>_vs_<B folder>.sqlite``: next to the samples, one file per pairing."""
    names = [os.path.basename(os.path.normpath(os.path.abspath(folder))) for folder in (dir_a, dir_b)]
    return os.path.join(os.path.dirname(os.path.abspath(dir_a)), f'human_eval_{names[0]}_vs_{names[1]}.sqlite')


def create_app(
    dir_a: str,
    dir_b: str,
    db_path: str,
    name_a: Optional[str] = None,
    name_b: Optional[str] = None,
    question: str = DEFAULT_QUESTION,
    seed: Optional[int] = None,
):
    """The Flask app of the study: voting at ``/``, results at ``/results`` and ``/results.json``.

    Args:
        dir_a (str): Samples of model A.
        dir_b (str): Samples of model B.
        db_path (str): SQLite file of the votes; an existing one resumes its study.
        name_a (str, optional): Label of A in the results. Default: the folder name.
        name_b (str, optional): Label of B in the results. Default: the folder name.
        question (str, optional): The question shown above the images. Default: ``DEFAULT_QUESTION``.
        seed (int, optional): Seed of the pair order and left/right sides; ``None`` draws from the OS.
    """
    from flask import Flask, abort, jsonify, make_response, redirect, render_template, request, send_file, url_for

    pairs = pair_folders(dir_a, dir_b)
    name_a = name_a or os.path.basename(os.path.normpath(os.path.abspath(dir_a)))
    name_b = name_b or os.path.basename(os.path.normpath(os.path.abspath(dir_b)))
    store = VoteStore(db_path)
    store.bind_study(dir_a, dir_b, name_a, name_b)
    by_id, folders = {pair.pair_id: pair for pair in pairs}, {'a': dir_a, 'b': dir_b}
    rng = random.Random(seed)
    app = Flask(__name__, template_folder=STATIC_DIR, static_folder=None)
    app.config.update(pairs=pairs, store=store)

    def current_rater() -> Optional[str]:
        name = (request.cookies.get(RATER_COOKIE) or '').strip()
        return name if _RATER_NAME.match(name) else None

    def remember(name: str):
        response = redirect(url_for('vote_page'), code=303)
        response.set_cookie(RATER_COOKIE, name, max_age=365 * 24 * 3600, samesite='Lax', httponly=True)
        return response

    def login_page(error: str = '', status: int = 200):
        return make_response(render_template('rater.html', error=error, total=len(pairs)), status)

    @app.get('/')
    def vote_page():
        if 'rater' in request.args:  # a shared link like /?rater=alice
            name = request.args['rater'].strip()
            return remember(name) if _RATER_NAME.match(name) else login_page(_bad_name(name), 400)
        rater = current_rater()
        if rater is None:
            return login_page()
        shown = store.next_pair(rater, pairs, rng)
        done = store.count_votes(rater)
        if shown is None:
            return render_template('done.html', rater=rater, total=len(pairs))
        pair, _ = shown
        return render_template(
            'vote.html', rater=rater, pair=pair, position=done + 1, total=len(pairs), question=question
        )

    @app.post('/rater')
    def set_rater():
        name = request.form.get('name', '').strip()
        return remember(name) if _RATER_NAME.match(name) else login_page(_bad_name(name), 400)

    @app.get('/logout')
    def logout():
        response = redirect(url_for('vote_page'), code=303)
        response.delete_cookie(RATER_COOKIE)
        return response

    @app.post('/vote')
    def vote():
        rater, pair = current_rater(), by_id.get(request.form.get('pair_id', ''))
        choice = request.form.get('choice', '')
        if rater is None:
            abort(403, 'Enter your name first.')
        if pair is None or choice not in CHOICES:
            abort(400, f'Need a known pair_id and a choice in {", ".join(CHOICES)}.')
        try:
            store.record_vote(rater, pair, choice)
        except LookupError as error:
            abort(400, str(error))
        return redirect(url_for('vote_page'), code=303)

    @app.get('/image/<pair_id>/<slot>')
    def image(pair_id: str, slot: str):
        # The URL names a pair and a screen side only, never a model or a path: the server resolves both.
        rater, pair = current_rater(), by_id.get(pair_id)
        left = store.left_side(rater, pair_id) if rater and pair else None
        if left is None or slot not in ('left', 'right'):
            abort(404)
        side = left if slot == 'left' else ('b' if left == 'a' else 'a')
        response = send_file(_image_path(folders[side], pair.file_a if side == 'a' else pair.file_b))
        response.headers['Cache-Control'] = 'no-store'  # the same URL shows other raters another order
        return response

    @app.get('/results.json')
    def results_json():
        return jsonify(summarize_votes(store.votes(), name_a, name_b))

    @app.get('/results')
    def results_page():
        results = summarize_votes(store.votes(), name_a, name_b)
        return render_template('results.html', results=results, percent=_percent, interval=_interval)

    return app


def _bad_name(name: str) -> str:
    return f'Rater name {name!r} is not valid: use 1 to 64 letters, digits, spaces or . @ _ -'


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m diffusion.evaluation.human_eval', description=__doc__.split('\n')[0]
    )
    commands = parser.add_subparsers(dest='command', required=True)
    serve = commands.add_parser('serve', help='Run the voting web app.')
    serve.add_argument('--a', required=True, help='Sample folder of model A (written by diffusion.inference.sample).')
    serve.add_argument('--b', required=True, help='Sample folder of model B.')
    serve.add_argument(
        '--db', default=None, help='SQLite file of the votes. Default: <parent of A>/human_eval_<A>_vs_<B>.sqlite.'
    )
    serve.add_argument('--host', default='127.0.0.1', help='Interface to listen on. Default: 127.0.0.1.')
    serve.add_argument('--port', type=int, default=8000, help='Port; 0 picks a free one. Default: 8000.')
    serve.add_argument('--name-a', default=None, help='Label of model A in the results. Default: its folder name.')
    serve.add_argument('--name-b', default=None, help='Label of model B in the results. Default: its folder name.')
    serve.add_argument('--question', default=DEFAULT_QUESTION, help='Question shown to raters.')
    report = commands.add_parser('report', help='Print the results of a study database.')
    report.add_argument('--db', required=True, help='SQLite file written by serve.')
    report.add_argument('--json', default=None, help='Also write the results as JSON to this file.')
    return parser


def _serve(args: argparse.Namespace) -> None:
    from werkzeug.serving import make_server

    db_path = args.db or default_db_path(args.a, args.b)
    app = create_app(args.a, args.b, db_path, args.name_a, args.name_b, args.question)
    server = make_server(args.host, args.port, app, threaded=True)
    print(f'Human evaluation: {len(app.config["pairs"])} pairs, votes in {db_path}', flush=True)
    print(f'Serving on http://{args.host}:{server.server_port}/ (results at /results); Ctrl+C stops.', flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry: ``serve`` or ``report``; returns the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == 'serve':
            _serve(args)
            return 0
        results = load_results(args.db)
    except (OSError, ValueError) as error:  # missing folders or database, no pairs, another study, port in use
        print(f'error: {error}', file=sys.stderr)
        return 1
    print(format_report(results))
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
