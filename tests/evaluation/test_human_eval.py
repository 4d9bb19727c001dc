"""The human preference study: statistics, pairing, the voting app, the report command and a two-rater browser run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from diffusion.evaluation.human_eval import (
    bootstrap_prompt_interval,
    create_app,
    default_db_path,
    load_results,
    load_samples,
    main,
    pair_folders,
    summarize_votes,
    wilson_interval,
)
from tests.conftest import REPO_ROOT, subprocess_env

RED, BLUE = (230, 20, 20), (20, 20, 230)


def write_samples(folder, color, prompts, seeds=(0,), jsonl=True, indices=None):
    """A folder as the sampling CLI writes it: ``{index:05d}_{seed}.png`` in one colour and ``samples.jsonl``."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for position, prompt in enumerate(prompts):
        index = indices[position] if indices else position
        for seed in seeds:
            name = f'{index:05d}_{seed}.png'
            Image.new('RGB', (16, 16), color).save(os.path.join(folder, name))
            rows.append({'file': name, 'prompt_index': index, 'prompt': prompt, 'seed': seed, 'guidance_scale': 7.5})
    if jsonl:
        with open(os.path.join(folder, 'samples.jsonl'), 'w') as handle:
            handle.writelines(json.dumps(row) + '\n' for row in rows)
    return folder


PROMPTS = ['a red circle', 'a blue square', 'two green triangles', 'a yellow star', 'a purple square']


@pytest.fixture
def study(tmp_path):
    """Folder A red, folder B blue, five shared prompts; yields (dir_a, dir_b, db)."""
    dir_a = write_samples(str(tmp_path / 'model_a'), RED, PROMPTS)
    dir_b = write_samples(str(tmp_path / 'model_b'), BLUE, PROMPTS)
    return dir_a, dir_b, str(tmp_path / 'votes.sqlite')


def color_of(client, pair_id, slot):
    response = client.get(f'/image/{pair_id}/{slot}')
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.data)).convert('RGB').getpixel((0, 0))


def shown_pair(client):
    html = client.get('/').get_data(as_text=True)
    match = re.search(r'data-pair-id="(\w+)"', html)
    return match[1] if match else None


def login(client, name):
    assert client.post('/rater', data={'name': name}).status_code == 303


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize('successes,total', [(0, 5), (3, 10), (8, 10), (50, 100), (1, 1), (17, 40)])
def test_wilson_interval_matches_scipy(successes, total):
    expected = stats.binomtest(successes, total).proportion_ci(confidence_level=0.95, method='wilson')
    assert wilson_interval(successes, total) == pytest.approx((expected.low, expected.high), abs=1e-9)


def test_wilson_interval_by_hand_and_errors():
    # 8 of 10, z = 1.96: center (0.8 + 0.19208) / 1.38416, half-width 1.96 * sqrt(0.016 + 0.009604) / 1.38416.
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=2e-4)
    with pytest.raises(ValueError, match='total=0'):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match='successes=6'):
        wilson_interval(6, 5)


def test_summary_counts_ties_half_with_per_prompt_breakdown():
    votes = [
        {'rater': 'bob', 'prompt': 'dog', 'prompt_index': 1, 'choice': 'b'},
        {'rater': 'ann', 'prompt': 'cat', 'prompt_index': 0, 'choice': 'a'},
        {'rater': 'bob', 'prompt': 'cat', 'prompt_index': 0, 'choice': 'a'},
        {'rater': 'ann', 'prompt': 'dog', 'prompt_index': 1, 'choice': 'tie'},
        {'rater': 'ann', 'prompt': 'bird', 'prompt_index': 2, 'choice': 'a'},
        {'rater': 'cid', 'prompt': 'cat', 'prompt_index': 0, 'choice': 'tie'},
    ]
    results = summarize_votes(votes, 'new', 'old')
    assert (results['wins_a'], results['wins_b'], results['ties'], results['num_votes']) == (3, 1, 2, 6)
    assert results['win_rate_a'] == pytest.approx(4 / 6)  # 3 wins + 2 ties / 2
    scipy_ci = stats.binomtest(4, 6).proportion_ci(method='wilson')
    assert results['ci95'] == pytest.approx([scipy_ci.low, scipy_ci.high], abs=1e-9)
    assert [row['prompt'] for row in results['per_prompt']] == ['cat', 'dog', 'bird']
    cat, dog, bird = results['per_prompt']
    assert (cat['num_votes'], cat['wins_a'], cat['ties'], cat['win_rate_a']) == (3, 2, 1, pytest.approx(2.5 / 3))
    assert (dog['wins_b'], dog['ties'], dog['win_rate_a']) == (1, 1, 0.25)
    assert bird['win_rate_a'] == 1.0 and bird['ci95'] == pytest.approx(list(wilson_interval(1, 1)))
    assert results['votes_per_rater'] == {'ann': 3, 'bob': 2, 'cid': 1}
    assert (results['model_a'], results['num_prompts'], results['num_raters']) == ('new', 3, 3)
    assert 'half' in results['tie_convention'] and 'Wilson' in results['ci_method']
    empty = summarize_votes([])
    assert (empty['num_votes'], empty['win_rate_a'], empty['ci95'], empty['ci95_bootstrap_prompts']) == (
        0,
        None,
        None,
        None,
    )


def test_bootstrap_over_prompts():
    # Every prompt has the same rate: every resample has it too.
    assert bootstrap_prompt_interval([1.5, 3.0, 0.75], [2, 4, 1]) == pytest.approx((0.75, 0.75))
    assert bootstrap_prompt_interval([1.0], [1]) is None
    # One vote per prompt: the bootstrap approaches the normal interval of a proportion.
    outcomes = (np.random.default_rng(1).random(400) < 0.3).astype(float)
    rate = outcomes.mean()
    half = 1.96 * np.sqrt(rate * (1 - rate) / 400)
    assert bootstrap_prompt_interval(outcomes, np.ones(400)) == pytest.approx((rate - half, rate + half), abs=0.01)
    # Five raters always agree per prompt: 100 independent observations, not 500, so wider than Wilson over votes;
    # a resampled rate is Binomial(100, 0.5) / 100, standard deviation 0.05.
    votes = [{'rater': str(r), 'prompt': str(p), 'choice': 'a' if p % 2 else 'b'} for p in range(100) for r in range(5)]
    results = summarize_votes(votes)
    low, high = results['ci95_bootstrap_prompts']
    assert (low, high) == pytest.approx((0.5 - 1.96 * 0.05, 0.5 + 1.96 * 0.05), abs=0.015)
    assert high - low > 2 * np.diff(results['ci95'])[0]


# ---------------------------------------------------------------- pairing


def test_pairs_by_index_and_seed_and_warns_about_unpaired(tmp_path):
    dir_a = write_samples(str(tmp_path / 'a'), RED, PROMPTS[:4], seeds=(0, 1))
    dir_b = write_samples(str(tmp_path / 'b'), BLUE, PROMPTS[:3], seeds=(1, 7))
    with pytest.warns(UserWarning, match=r'Paired 3 images by \(prompt_index, seed\); 5 image\(s\) in .*a. and 3 in'):
        pairs = pair_folders(dir_a, dir_b)
    assert [(pair.file_a, pair.file_b, pair.prompt, pair.seed) for pair in pairs] == [
        (f'{index:05d}_1.png', f'{index:05d}_1.png', PROMPTS[index], 1) for index in range(3)
    ]
    assert len({pair.pair_id for pair in pairs}) == 3
    with pytest.warns(UserWarning):
        again = pair_folders(dir_a, dir_b)
    assert [pair.pair_id for pair in again] == [pair.pair_id for pair in pairs]  # stable across restarts


def test_pairs_by_prompt_text_when_indices_differ(tmp_path):
    dir_a = write_samples(str(tmp_path / 'a'), RED, PROMPTS)
    # B sampled the prompts in another order (and one prompt twice): indices name different prompts.
    shuffled = [PROMPTS[3], PROMPTS[0], PROMPTS[4], PROMPTS[1], PROMPTS[2], PROMPTS[0]]
    dir_b = write_samples(str(tmp_path / 'b'), BLUE, shuffled)
    with pytest.warns(UserWarning, match=r'by \(prompt, seed\); 0 image\(s\) in .* and 1 in'):
        pairs = pair_folders(dir_a, dir_b)
    prompt_of = {row['file']: row['prompt'] for row in load_samples(dir_b)}
    assert len(pairs) == 5
    for pair in pairs:
        assert prompt_of[pair.file_b] == pair.prompt == PROMPTS[int(pair.file_a[:5])]
    assert {pair.file_b for pair in pairs if pair.prompt == PROMPTS[0]} == {'00001_0.png'}  # first copy


def test_pairs_by_file_name_without_samples_jsonl(tmp_path):
    dir_a = write_samples(str(tmp_path / 'a'), RED, PROMPTS[:3], jsonl=False)
    dir_b = write_samples(str(tmp_path / 'b'), BLUE, PROMPTS[:3], jsonl=False)
    for folder in (dir_a, dir_b):  # the sampling CLI's grid and other files are not samples
        Image.new('RGB', (4, 4)).save(os.path.join(folder, 'contact_sheet.png'))
        Image.new('RGB', (4, 4)).save(os.path.join(folder, 'extra.png'))
        open(os.path.join(folder, 'notes.txt'), 'w').close()
    pairs = pair_folders(dir_a, dir_b)
    assert [(pair.file_a, pair.file_b, pair.prompt) for pair in pairs] == [
        ('00000_0.png', '00000_0.png', 'prompt 0'),
        ('00001_0.png', '00001_0.png', 'prompt 1'),
        ('00002_0.png', '00002_0.png', 'prompt 2'),
        ('extra.png', 'extra.png', 'extra.png'),
    ]


def test_pairing_errors_name_the_folder(tmp_path):
    good = write_samples(str(tmp_path / 'good'), RED, PROMPTS[:2])
    missing = str(tmp_path / 'missing')
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        pair_folders(good, missing)
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(ValueError, match=r'empty.* holds no images'):
        pair_folders(str(tmp_path / 'empty'), good)
    other = write_samples(str(tmp_path / 'other'), BLUE, PROMPTS[:2], seeds=(5,))
    with pytest.raises(ValueError, match=r'good.*\(2 images\) and .*other.* share no pair'):
        pair_folders(good, other)
    evil = write_samples(str(tmp_path / 'evil'), BLUE, PROMPTS[:1])
    Image.new('RGB', (4, 4)).save(tmp_path / 'secret.png')
    with open(os.path.join(evil, 'samples.jsonl'), 'a') as handle:
        handle.write(json.dumps({'file': '../secret.png', 'prompt_index': 1, 'prompt': PROMPTS[1], 'seed': 0}) + '\n')
    with pytest.raises(ValueError, match=r"'\.\./secret\.png'.*outside the folder"):
        load_samples(evil)
    with open(os.path.join(good, 'samples.jsonl'), 'a') as handle:
        handle.write('{"prompt": "no file"}\n')
    with pytest.raises(ValueError, match=r'samples\.jsonl, line 3: expected an object with a "file" key'):
        load_samples(good)


# ---------------------------------------------------------------- the app


def test_each_rater_sees_every_pair_once_then_done(study):
    app = create_app(*study, seed=0)
    clients = {name: app.test_client() for name in ('ann', 'José B.')}
    for name, client in clients.items():
        assert 'Your name' in client.get('/').get_data(as_text=True)
        login(client, name)
    seen = {name: [] for name in clients}
    for _ in range(5):
        for name, client in clients.items():  # interleaved, as two raters at once
            pair_id = shown_pair(client)
            assert shown_pair(client) == pair_id  # a reload shows the same pair, not a new one
            seen[name].append(pair_id)
            assert client.post('/vote', data={'pair_id': pair_id, 'choice': 'tie'}).status_code == 303
    all_ids = {pair.pair_id for pair in app.config['pairs']}
    for name, client in clients.items():
        assert len(seen[name]) == 5 and set(seen[name]) == all_ids
        assert shown_pair(client) is None
        assert 'You have rated all 5 pairs' in client.get('/').get_data(as_text=True)
    assert load_results(study[2])['votes_per_rater'] == {'ann': 5, 'José B.': 5}


def test_votes_map_sides_back_to_models(tmp_path):
    dir_a = write_samples(str(tmp_path / 'a'), RED, [f'prompt {i}' for i in range(12)])
    dir_b = write_samples(str(tmp_path / 'b'), BLUE, [f'prompt {i}' for i in range(12)])
    db = str(tmp_path / 'votes.sqlite')
    client = create_app(dir_a, dir_b, db, name_a='red', name_b='blue', seed=3).test_client()
    client.get('/?rater=ann')
    red_sides = []
    for round_ in range(12):
        pair_id = shown_pair(client)
        red_side = 'left' if color_of(client, pair_id, 'left') == RED else 'right'
        assert color_of(client, pair_id, 'right' if red_side == 'left' else 'left') == BLUE
        red_sides.append(red_side)
        choice = red_side if round_ < 8 else ('tie' if round_ < 10 else {'left': 'right', 'right': 'left'}[red_side])
        client.post('/vote', data={'pair_id': pair_id, 'choice': choice})
    assert set(red_sides) == {'left', 'right'}  # the order is randomised
    results = client.get('/results.json').get_json()
    assert (results['wins_a'], results['ties'], results['wins_b'], results['model_a']) == (8, 2, 2, 'red')
    assert results['win_rate_a'] == pytest.approx(9 / 12)
    with sqlite3.connect(db) as connection:
        stored = connection.execute('SELECT left_side FROM votes ORDER BY id').fetchall()
    assert ['left' if side == 'a' else 'right' for (side,) in stored] == red_sides
    page = client.get('/results').get_data(as_text=True)
    assert '<b id="win-rate">75.0%</b>' in page and 'Wilson score interval' in page and 'ties / 2' in page
    assert '<td class="text">prompt 11</td>' in page


def test_voting_page_hides_models_and_refuses_bad_requests(study, tmp_path):
    client = create_app(*study, name_a='SECRET-A', name_b='SECRET-B', seed=0).test_client()
    assert client.post('/vote', data={'pair_id': 'x', 'choice': 'left'}).status_code == 403
    assert client.post('/rater', data={'name': '<script>'}).status_code == 400
    assert 'is not valid' in client.get('/?rater=' + 'x' * 65).get_data(as_text=True)
    login(client, 'ann')
    html = client.get('/').get_data(as_text=True)
    assert 'SECRET' not in html and 'model_a' not in html and 'model_b' not in html
    assert 'right is better' in html and '<kbd>0</kbd> tie' in html  # shortcuts on the page
    pair_id = shown_pair(client)
    assert client.post('/vote', data={'pair_id': pair_id, 'choice': 'A'}).status_code == 400
    assert client.post('/vote', data={'pair_id': 'nope', 'choice': 'left'}).status_code == 400
    unshown = next(pair.pair_id for pair in client.application.config['pairs'] if pair.pair_id != pair_id)
    assert client.post('/vote', data={'pair_id': unshown, 'choice': 'left'}).status_code == 400
    assert client.get(f'/image/{unshown}/left').status_code == 404  # only pairs shown to this rater
    assert load_results(study[2])['num_votes'] == 0


def test_images_outside_the_folders_are_refused(study, tmp_path):
    (tmp_path / 'secret.txt').write_text('top secret')
    client = create_app(*study, seed=0).test_client()
    login(client, 'ann')
    pair_id = shown_pair(client)
    assert client.get(f'/image/{pair_id}/left').status_code == 200
    for url in [
        '/image/../../secret.txt',
        f'/image/{pair_id}/../../../secret.txt',
        f'/image/{pair_id}/..%2F..%2Fsecret.txt',
        '/image/..%2Fsecret.txt/left',
        f'/image/{pair_id}/%2E%2E',
        '/image/%2E%2E/left',
        f'/image/{pair_id}/a',
    ]:
        response = client.get(url)
        assert response.status_code == 404 and b'top secret' not in response.data, url


def test_restart_keeps_votes_and_progress(study):
    dir_a, dir_b, db = study
    first = create_app(*study, seed=0).test_client()
    first.get('/?rater=ann')
    rated = []
    for _ in range(2):
        rated.append(shown_pair(first))
        first.post('/vote', data={'pair_id': rated[-1], 'choice': 'right'})
    second = create_app(*study, seed=0).test_client()  # a new server on the same database
    second.get('/?rater=ann')
    assert second.get('/results.json').get_json()['num_votes'] == 2
    later = []
    while (pair_id := shown_pair(second)) is not None:
        later.append(pair_id)
        second.post('/vote', data={'pair_id': pair_id, 'choice': 'left'})
    assert len(later) == 3 and not set(later) & set(rated)
    with pytest.raises(ValueError, match=r'holds the study .* pass another --db'):
        create_app(dir_b, dir_a, db)  # A and B swapped would flip every vote


def test_concurrent_raters_lose_no_vote(study):
    app = create_app(*study, seed=0)
    errors = []

    def rate(name):
        try:
            client = app.test_client()
            client.get(f'/?rater={name}')
            while (pair_id := shown_pair(client)) is not None:
                assert client.post('/vote', data={'pair_id': pair_id, 'choice': 'left'}).status_code == 303
        except Exception as error:  # reported below: an exception in a thread does not fail the test
            errors.append(error)

    threads = [threading.Thread(target=rate, args=(f'rater{index}',)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    results = load_results(study[2])
    assert results['num_votes'] == 30 and set(results['votes_per_rater'].values()) == {5}


def test_report_command(study, tmp_path, capsys):
    client = create_app(*study, name_a='red', name_b='blue', seed=0).test_client()
    client.get('/?rater=ann')
    for choice in ('left', 'left', 'tie', 'right', 'left'):
        client.post('/vote', data={'pair_id': shown_pair(client), 'choice': choice})
    out = str(tmp_path / 'results.json')
    assert main(['report', '--db', study[2], '--json', out]) == 0
    with open(out) as handle:
        written = json.load(handle)
    assert written == client.get('/results.json').get_json()
    low, high = written['ci95']
    printed = capsys.readouterr().out
    assert f'Win rate of A over B: {100 * written["win_rate_a"]:.1f}%' in printed
    assert f'95% CI [{100 * low:.1f}%, {100 * high:.1f}%] (Wilson' in printed
    assert 'A = red, B = blue' in printed and printed.count('\n') >= 6 + 5  # a row per prompt
    assert main(['report', '--db', str(tmp_path / 'nope.sqlite')]) == 1
    assert 'nope.sqlite' in capsys.readouterr().err
    assert main(['serve', '--a', str(tmp_path / 'gone'), '--b', study[1], '--db', study[2], '--port', '0']) == 1
    assert 'gone' in capsys.readouterr().err


def test_default_db_path_sits_next_to_the_samples(tmp_path):
    path = default_db_path(str(tmp_path / 'runs' / 'new' / ''), str(tmp_path / 'old'))
    assert path == str(tmp_path / 'runs' / 'human_eval_new_vs_old.sqlite')


# ---------------------------------------------------------------- end to end in a browser

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
CHROMEDRIVER = shutil.which('chromedriver')
# The page reads a pixel of each image: which side shows model A (red) is learnt from the picture, as a rater would.
PIXEL_JS = """
const img = document.getElementById(arguments[0]);
if (!img || !img.complete || img.naturalWidth === 0) return null;
const canvas = document.createElement('canvas');
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
const context = canvas.getContext('2d');
context.drawImage(img, 0, 0);
return Array.from(context.getImageData(0, 0, 1, 1).data.slice(0, 3));
"""


def start_server(dir_a, dir_b, db, log):
    command = [sys.executable, '-m', 'diffusion.evaluation.human_eval', 'serve', '--a', dir_a, '--b', dir_b]
    command += ['--db', db, '--port', '0', '--name-a', 'red', '--name-b', 'blue']
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=subprocess_env(),
    )
    lines = queue.Queue()  # a reader thread, so a silent server cannot block the test past its deadline
    threading.Thread(target=lambda: [*map(lines.put, process.stdout), lines.put(None)], daemon=True).start()
    deadline = time.time() + 60
    with contextlib.suppress(queue.Empty):
        while (line := lines.get(timeout=max(deadline - time.time(), 0.01))) is not None:
            if match := re.search(r'Serving on (http://\S+/)', line):
                return process, match[1]
    process.kill()
    pytest.fail(f'the server did not start; its log: {open(log.name).read()[-2000:]}')


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        '--headless=new',
        '--no-sandbox',
        '--disable-dev-shm-usage',
        '--disable-gpu',
        '--window-size=1200,900',
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def vote_in_browser(driver, key_for):
    """Reads which side is red, presses ``key_for(red_side)``, waits for the next page; returns (pair, red side)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # A page may still be loading (after the login form, or the previous vote): read it once it is there.
    wait = WebDriverWait(driver, 15, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
    pair_id = wait.until(lambda d: d.find_element(By.ID, 'pair').get_attribute('data-pair-id'))
    left, right = (
        wait.until(lambda d, slot=slot: d.execute_script(PIXEL_JS, slot)) for slot in ('left-image', 'right-image')
    )
    assert {tuple(left), tuple(right)} == {RED, BLUE}
    red_side = 'left' if tuple(left) == RED else 'right'
    ActionChains(driver).send_keys(key_for(red_side)).perform()

    def moved_on(d):
        pairs = d.find_elements(By.ID, 'pair')
        return d.find_elements(By.ID, 'done') or (pairs and pairs[0].get_attribute('data-pair-id') != pair_id)

    wait.until(moved_on)
    return pair_id, red_side


@pytest.mark.slow
def test_two_raters_in_browsers_across_a_restart(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip('needs chromium and chromedriver (apt-get install -y chromium chromium-driver)')
    pytest.importorskip('selenium', reason='needs selenium 4 (pip install selenium)')
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    prompts = [f'prompt number {index}' for index in range(6)]
    dir_a = write_samples(str(tmp_path / 'red'), RED, prompts)
    dir_b = write_samples(str(tmp_path / 'blue'), BLUE, [*prompts, 'only in B'])
    db = str(tmp_path / 'votes.sqlite')
    red_key = {'left': Keys.ARROW_LEFT, 'right': Keys.ARROW_RIGHT}  # vote for A, whichever side it is on
    blue_digit = {'left': '2', 'right': '1'}  # vote for B
    red_digit = {'left': '1', 'right': '2'}
    # Per rater, the key to press for each successive pair (a function of the side A is on), and the expected vote.
    plans = {
        'ann': [(red_key.get, 'a')] * 3 + [(red_digit.get, 'a')] * 3,
        'bob': [(blue_digit.get, 'b'), (lambda side: Keys.SPACE, 'tie'), (lambda side: Keys.ARROW_DOWN, 'tie')]
        + [(lambda side: '0', 'tie'), (blue_digit.get, 'b'), (red_key.get, 'a')],
    }
    expected, seen, drivers, server = {}, {'ann': [], 'bob': []}, {}, None
    with open(tmp_path / 'server.log', 'w') as log:
        try:
            server, url = start_server(dir_a, dir_b, db, log)
            drivers = {'ann': browser(), 'bob': browser()}
            drivers['ann'].get(url)
            drivers['ann'].find_element(By.ID, 'rater-name').send_keys('ann', Keys.ENTER)
            drivers['bob'].get(url + '?rater=bob')

            def vote(name):
                key_for, choice = plans[name][len(seen[name])]
                pair_id, red_side = vote_in_browser(drivers[name], key_for)
                seen[name].append(pair_id)
                expected[(name, pair_id)] = (choice, 'a' if red_side == 'left' else 'b')

            for name in ('ann', 'bob', 'ann', 'bob', 'ann'):
                vote(name)
            server.kill()  # SIGKILL: nothing gets a chance to flush
            server.wait()
            server, url = start_server(dir_a, dir_b, db, log)
            for name, driver in drivers.items():
                driver.get(url)  # the cookie (per host, not per port) still names the rater
                assert driver.find_element(By.ID, 'rater').text == name
                assert driver.find_element(By.ID, 'position').text == str(len(seen[name]) + 1)
            while len(seen['ann']) < 6 or len(seen['bob']) < 6:
                for name in ('ann', 'bob'):
                    if len(seen[name]) < 6:
                        vote(name)
            for driver in drivers.values():
                assert 'You have rated all 6 pairs' in driver.find_element(By.TAG_NAME, 'body').text
            with urllib.request.urlopen(url + 'results.json') as response:
                results = json.load(response)
            drivers['ann'].get(url + 'results')
            page = {key: drivers['ann'].find_element(By.ID, key).text for key in ('win-rate', 'wins-a', 'ties', 'ci95')}
        finally:
            for driver in drivers.values():
                driver.quit()
            if server is not None:
                server.kill()
                server.wait()
    for name in seen:
        assert sorted(seen[name]) == sorted(set(seen[name])) and len(seen[name]) == 6
    with sqlite3.connect(db) as connection:
        stored = {
            (r, p): (c, side)
            for r, p, c, side in connection.execute('SELECT rater, pair_id, choice, left_side FROM votes')
        }
    assert stored == expected  # every vote, before and after the kill, with A/B recovered from the colours
    assert 'have no counterpart' in (tmp_path / 'server.log').read_text()  # the extra image in B
    assert (results['wins_a'], results['wins_b'], results['ties'], results['num_votes']) == (7, 2, 3, 12)
    assert results['win_rate_a'] == pytest.approx(8.5 / 12)
    assert results['ci95'] == pytest.approx(list(wilson_interval(8.5, 12)))
    assert results['votes_per_rater'] == {'ann': 6, 'bob': 6}
    assert page['win-rate'] == '70.8%' and page['wins-a'] == '7' and page['ties'] == '3'
    low, high = results['ci95']
    assert page['ci95'] == f'[{100 * low:.1f}%, {100 * high:.1f}%]'
