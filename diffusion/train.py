"""Train from a config: build the ``Trainer`` (:mod:`diffusion.builders`) and fit it; ``train.py``'s command line.

This is the top of the package, beside the other command-line entry points (:mod:`diffusion.inference`,
:mod:`diffusion.pipeline`, ``python -m diffusion.evaluation.metrics``); nothing in the package imports it.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from composer import Trainer
from composer.callbacks import CheckpointSaver
from composer.utils import dist, partial_format

from diffusion.builders import (
    RestoreRngMidEpoch,
    build_dataloader,
    build_model,
    build_optimizer,
    build_plugins,
    build_trainer,
    check_sections,
)
from diffusion.config import load_config
from diffusion.utils import ConfigError

__all__ = [
    'main',
    'train',
    # Re-exported from diffusion.builders, where they moved, for code that imports them from here.
    'RestoreRngMidEpoch',
    'build_dataloader',
    'build_model',
    'build_optimizer',
    'build_plugins',
    'build_trainer',
    'check_sections',
]


def train(cfg: Any) -> Trainer:
    """Build the Trainer from ``cfg``, fit it, close it and say where its checkpoints are; return it (closed)."""
    trainer = build_trainer(cfg)
    trainer.fit()
    trainer.close()  # the progress bar finishes its line first, so the summary gets its own
    if dist.get_global_rank() == 0:
        print(checkpoint_summary(trainer, cfg.get('save_folder')), flush=True)
    return trainer


def checkpoint_summary(trainer: Trainer, save_folder: Optional[str]) -> str:
    """One line saying where the run's checkpoints are and which is the latest, for the end of a run."""
    if not save_folder:
        return 'No checkpoints were saved: save_folder is not set.'
    folder = partial_format(save_folder, run_name=trainer.state.run_name)  # as Composer formats it
    saver = next((c for c in trainer.state.callbacks if isinstance(c, CheckpointSaver)), None)
    saved = list(saver.all_saved_checkpoints_to_timestamp) if saver is not None else []
    if not saved:
        return f'Checkpoints: {folder} (none saved yet).'
    # The saver names local files (in a staging folder when save_folder is remote); a sharded checkpoint is a folder.
    path = saved[-1]
    name = os.path.basename(os.path.dirname(path)) if trainer.state.fsdp_sharded_state_dict_enabled else path
    latest = f'{folder.rstrip("/")}/{os.path.basename(name)}'
    return f'Checkpoints: {folder} (latest: {latest}; resume with autoresume=true or load_path={latest}).'


def main(argv: Optional[list[str]] = None) -> None:
    """Command line: ``train.py <config.yaml> [override ...]`` (Hydra override grammar).

    A config that cannot work (:class:`~diffusion.utils.ConfigError`: an unknown key, a wrong value, a bucket
    without credentials, a save folder of another run) ends the command with one line naming the key, exit code 2.
    """
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ('-h', '--help'):
        print('usage: composer train.py yamls/<config>.yaml [key=value ...]')
        raise SystemExit(0 if argv else 2)
    try:
        train(load_config(argv[0], argv[1:]))
    except ConfigError as error:
        # Every rank refuses alike, and every rank says why: the launcher stops the others when the first one exits,
        # and shows the output of the rank that exited (rank 0's is the console).
        print(f'error: {error}', file=sys.stderr, flush=True)
        raise SystemExit(2) from None
