"""The file logger's log.txt: metric lines stay whole when a progress bar draws on the stderr it captures."""

import io
import sys

from composer.loggers import FileLogger as ComposerFileLogger

from diffusion import registry
from diffusion.builders import build_trainer
from tests.conftest import tiny_config

PREFIXES = ('[stderr]: ', '[stdout]: ', '[metric][batch=', '[hyperparameter]: ', '[trace]: ', '[table]: ')


def test_a_runs_log_has_whole_metric_lines_and_no_progress_bar_fragments(synthetic_dataset, tmp_path):
    # Composer's FileLogger copies stderr into the log, the progress bar's carriage returns and cursor moves
    # included: '[stderr]: \rtrain  0%|...| 0/1200 [...]  \x1b[Atime/epoch: 0', the next metric glued to the bar.
    trainer = build_trainer(
        tiny_config(synthetic_dataset, str(tmp_path), 'max_duration=3ba', 'save_folder=null', 'progress_bar=true')
    )
    trainer.fit()
    trainer.close()
    log = (tmp_path / 'log.txt').read_text()
    assert '\r' not in log and '\x1b' not in log
    lines = [line for line in log.splitlines() if line.strip()]
    assert all(line.startswith(PREFIXES) for line in lines), [line for line in lines if not line.startswith(PREFIXES)]
    metrics = [line for line in lines if 'time/' in line or 'loss/train/total' in line]
    assert all(line.startswith('[metric][batch=') for line in metrics), metrics
    assert [line.split(':')[0] for line in metrics if 'loss/train/total' in line] == [
        f'[metric][batch={batch}]' for batch in range(3)
    ]


def test_redraws_are_dropped_and_other_stderr_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, 'stderr', io.StringIO())
    logger = registry.loggers.build('file', {'filename': str(tmp_path / 'log.txt')})
    assert isinstance(logger, ComposerFileLogger)
    for text in ('\n', '\rtrain   0%|   | 0/3 [00:00<?, ?ba/s]', '\x1b[A', 'a warning', '\n', '\r' + ' ' * 40 + '\r'):
        sys.stderr.write(text)
    logger.log_metrics({'loss/train/total': 0.5}, step=1)
    assert logger._queue.qsize() and ''.join(logger._queue.queue) == (
        '[stderr]: a warning\n[metric][batch=1]: loss/train/total: 0.5000 \n'
    )
    assert sys.stderr.getvalue().startswith('\n\rtrain')  # the terminal still gets everything


def test_ranks_other_than_0_write_a_file_of_their_own(tmp_path, monkeypatch):
    # Two ranks opened the yaml's one log.txt and overwrote each other's lines ('tric][batch=40]: lr-AdamW...').
    from types import SimpleNamespace

    from composer.utils import dist

    state = SimpleNamespace(run_name='run')
    for rank, filename, expected in [
        (0, 'log.txt', 'log.txt'),
        (1, 'log.txt', 'log-rank1.txt'),
        (1, 'log-{rank}.txt', 'log-1.txt'),
    ]:
        monkeypatch.setattr(dist, 'get_global_rank', lambda rank=rank: rank)
        monkeypatch.setattr(dist, 'get_local_rank', lambda rank=rank: rank)
        logger = registry.loggers.build('file', {'filename': str(tmp_path / filename), 'capture_stderr': False,
                                                 'capture_stdout': False})  # fmt: skip
        logger.init(state, None)
        assert logger.filename == str(tmp_path / expected)
        logger.file.close()
