"""A one-line progress bar for long operations, drawn on a terminal only.

    bar = ProgressBar("convert", enabled=None)      # None: draw only when stderr is a terminal
    bar(done_bytes, total_bytes)                     # library operations call this as progress=
    bar.finish()

It shows bytes done, the rate and the estimated time left, redrawn at most a few times a second
so that drawing never costs measurable time.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, one decimal above bytes)."""
    n = float(n)
    for unit in UNITS:
        if abs(n) < 1024 or unit == UNITS[-1]:
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """Callable progress sink: ``bar(done, total)``; silent unless *enabled* (default: stderr is a tty)."""

    WIDTH = 28
    INTERVAL = 0.2

    def __init__(self, label: str = "", enabled: Optional[bool] = None, stream: Optional[TextIO] = None):
        self.stream = stream or sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.label = label
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False
        self._done = 0
        self._total = 0

    def __call__(self, done: int, total: int) -> None:
        self._done, self._total = done, total
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_draw < self.INTERVAL and done < total:
            return
        self._last_draw = now
        self._draw(now)

    def line(self, now: Optional[float] = None) -> str:
        """The text of the bar for the current state (exposed for tests)."""
        now = time.monotonic() if now is None else now
        done, total = self._done, self._total
        frac = min(1.0, done / total) if total else 1.0
        filled = int(frac * self.WIDTH)
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 and total > done else 0.0
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        head = f"{self.label} " if self.label else ""
        return (f"{head}[{bar}] {frac * 100:5.1f}% {human_bytes(done)}/{human_bytes(total)} "
                f"{human_bytes(rate)}/s ETA {_clock(eta)}")

    def _draw(self, now: float) -> None:
        self.stream.write("\r" + self.line(now) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        """Draw the final state and end the line (nothing when disabled)."""
        if self.enabled and self._drawn:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
