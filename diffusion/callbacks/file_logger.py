"""Composer's ``FileLogger`` without the progress bar's terminal redraws in the log file.

The file logger copies what the run writes to stdout and stderr into its file, line by line with a prefix. The
progress bar draws on stderr with carriage returns and cursor moves, never ending a line, so the log got
``[stderr]: \\rtrain  0%|...| 0/1200 [...]  \\x1b[Atime/epoch: 0``: bar fragments, and the next metric glued to
them without its ``[metric]`` prefix. Here those redraws (text after a carriage return up to the line's end, ANSI
escape sequences, and the blank lines the bar moves through) are left out of the file; the terminal still gets
everything, and the metrics are in the file as their own lines.
"""

from __future__ import annotations

import re
from typing import Callable

from composer.loggers import FileLogger as ComposerFileLogger

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
    """Composer's ``FileLogger`` (same arguments) whose copy of stdout and stderr leaves out terminal redraws."""

    def _get_new_writer(self, prefix: str, original_writer: Callable[[str], int]) -> Callable[[str], int]:
        def new_write(text: str) -> int:
            if not self._closed:
                kept = without_redraws(text, self._is_newline)
                if kept:
                    self.write(prefix, kept)
            return original_writer(text)

        return new_write
