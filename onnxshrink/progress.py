"""Progress: rich progress bars and log lines on stderr for long steps (reference outputs,
sensitivity sweeps, allocation trials), silent when disabled or when stderr is not a terminal.

Low in the layer order so a pass's Context can carry one without the passes importing the
pipeline layer."""

from __future__ import annotations

__all__ = ["Progress"]

import sys
from typing import Iterable


class Progress:
    """Progress bars on stderr for long steps (rich), silent when disabled or not a terminal."""

    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and getattr(self.stream, "isatty", lambda: False)()

    def track(self, iterable: Iterable, description: str = "", total: int | None = None):
        if not self.enabled:
            yield from iterable
            return
        from rich.console import Console
        from rich.progress import track
        if total is None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        yield from track(iterable, description=description, total=total, console=Console(file=self.stream),
                         transient=True)

    def log(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream)
