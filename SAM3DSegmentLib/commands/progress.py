"""A one-line text progress bar on stderr, shared by the commands that show one."""

from __future__ import annotations

import sys


class TextProgress:
    """Draws ``PREFIX[####....] done/total label`` over itself; a new line when finished."""

    def __init__(self, prefix: str = "", stream=None, width: int = 30):
        self.prefix = prefix
        self.stream = stream or sys.stderr
        self.width = width

    def show(self, done: int, total: int, label: str, finished: bool) -> None:
        total = max(total, 1)
        filled = int(self.width * min(done, total) / total)
        self.stream.write(f"\r{self.prefix}[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {label}   ")
        if finished:
            self.stream.write("\n")
        self.stream.flush()
