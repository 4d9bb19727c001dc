"""Composer's ``FileLogger`` without the progress bar's terminal redraws in the log file.

The file logger copies what the run writes to stdout and stderr into its file, line by line with a prefix. The
progress bar draws on stderr with carriage returns and cursor moves, never ending a line, so the log got
``[stderr]: \\rtrain  0%|...| 0/1200 [...]  \\x1b[Atime/epoch: 0``: bar fragments, and the next metric glued to
them without its ``[metric]`` prefix. Here those redraws (text after a carriage return up to the line's end, ANSI
escape sequences, and the blank lines the bar moves through) are left out of the file; the terminal still gets
everything, and the metrics are in the file as their own lines.

A yaml names one file for the run (``${run_folder}/log.txt``), but every rank has a file logger: Composer's opened
the same file on each rank, which then overwrote each other's lines. A rank other than 0 writes to
``log-rank<r>.txt`` beside it instead, unless the name already holds a rank placeholder.
"""

from __future__ import annotations

import os
import re
from typing import Callable

from composer.core import State
from composer.loggers import FileLogger as ComposerFileLogger
from composer.loggers import Logger
from composer.utils import dist

__all__ = ['FileLogger', 'without_redraws']

_ESCAPE = re.compile(r'\x1b\[[0-9;?]*[A-Za-z]')
_REDRAW = re.compile(r'\r[^\n]*')


def without_redraws(text: str, at_line_start: bool) -> str:
    """``text`` without terminal redraws; newlines that would only make blank lines at a line start are dropped."""
    kept = _REDRAW.sub('', _ESCAPE.sub('', text))
    if at_line_start and not kept.strip('\n'):
        return ''
    return kept


class FileLogger(ComposerFileLogger):
    """Composer's ``FileLogger`` (same arguments) whose copy of stdout and stderr leaves out terminal redraws, and
    whose ranks other than 0 write files of their own."""

    def _get_new_writer(self, prefix: str, original_writer: Callable[[str], int]) -> Callable[[str], int]:
        def new_write(text: str) -> int:
            if not self._closed:
                kept = without_redraws(text, self._is_newline)
                if kept:
                    self.write(prefix, kept)
            return original_writer(text)

        return new_write

    def init(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0 and not re.search(r'\{(rank|local_rank|node_rank)\}', self.filename_format):
            for attribute in ('filename_format', 'remote_file_name_format'):
                root, extension = os.path.splitext(getattr(self, attribute))
                setattr(self, attribute, f'{root}-rank{{rank}}{extension}')
        super().init(state, logger)
