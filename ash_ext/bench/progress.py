"""The progress display on stderr, counted in the cases' expected seconds (:mod:`ash_ext.bench.estimate`)."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


class Progress:
    """A one-line progress bar on stderr (``\\r``-updated on a TTY, a line every ~10% or 30 s otherwise).

    ``weights`` are the cases' expected costs, in the order they run; the ETA scales the time
    spent so far by the weight still to do.
    """

    def __init__(self, weights: list[float], enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.weights = weights
        self.total = sum(weights) or 1.0
        self.enabled = enabled
        self.stream = stream
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.columns = max(40, shutil.get_terminal_size((100, 20)).columns - 1)
        self.start = time.perf_counter()
        self.done_weight = 0.0
        self.index = 0
        self.last_line = 0.0
        self.last_decile = -1

    def _eta(self) -> str:
        elapsed = time.perf_counter() - self.start
        if self.done_weight <= 0:
            return "--:--"
        left = elapsed / self.done_weight * (self.total - self.done_weight)
        return f"{int(left // 60):02d}:{int(left % 60):02d}"

    def update(self, label: str) -> None:
        """Show that the case ``label`` (the next one) is being timed."""
        if not self.enabled:
            return
        n = len(self.weights)
        frac = self.done_weight / self.total
        elapsed = time.perf_counter() - self.start
        if self.tty:
            width = 24
            filled = round(frac * width)
            line = (
                f"[{'#' * filled}{'.' * (width - filled)}] {self.index}/{n} {elapsed:5.0f}s eta {self._eta()}  {label}"
            )
            cols = self.columns
            self.stream.write("\r" + line[:cols].ljust(cols))
            self.stream.flush()
        else:
            decile = int(frac * 10)
            if decile > self.last_decile or elapsed - self.last_line > 30:
                self.last_decile = decile
                self.last_line = elapsed
                self.stream.write(f"bench: {self.index}/{n} cases, {elapsed:.0f}s, eta {self._eta()}: {label}\n")
                self.stream.flush()

    def advance(self) -> None:
        """Count the current case as done."""
        self.done_weight += self.weights[self.index]
        self.index += 1

    def close(self) -> None:
        """Clear the bar (on a TTY)."""
        if self.enabled and self.tty:
            self.stream.write("\r" + " " * self.columns + "\r")
            self.stream.flush()
