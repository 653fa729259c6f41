"""Progress reporting and resource accounting shared by the conversion CLIs.

``Progress`` draws a one-line bar (bytes done / total, rate, ETA) rewritten in place on a TTY and
prints plain lines at most every ``interval`` seconds otherwise (logs, CI). ``peak_rss_bytes``
reads the process' peak resident set size from the kernel.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import TextIO

_UNITS = ("B", "KB", "MB", "GB", "TB")


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as disk sizes and the HF index are quoted)."""
    for unit in _UNITS:
        if abs(n) < 1000 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    """3725 -> '1h02m05s'."""
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class Progress:
    """Byte progress with rate and ETA.

    Args:
      total: bytes expected.
      label: prefix of every line.
      stream: where to draw (default stderr); ``None`` disables output.
      interval: seconds between plain lines when ``stream`` is not a TTY.
    """

    def __init__(
        self,
        total: int,
        label: str,
        stream: TextIO | None = sys.stderr,
        interval: float = 10.0,
    ) -> None:
        self.total, self.label, self.stream, self.interval = max(total, 1), label, stream, interval
        self.done = 0
        self.start = time.monotonic()
        self._last = -float("inf")
        self._tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())

    def update(self, nbytes: int, note: str = "") -> None:
        """Adds ``nbytes`` done; redraws (TTY) or prints a line if ``interval`` has passed."""
        self.done += nbytes
        now = time.monotonic()
        if self.stream is None or (now - self._last < (0.2 if self._tty else self.interval)):
            return
        self._last = now
        self._draw(note)

    def line(self, note: str = "") -> str:
        """The current status line."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        frac = min(self.done / self.total, 1.0)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        bar = "#" * int(frac * 30)
        eta_s = human_seconds(eta) if eta != float("inf") else "?"
        text = (
            f"{self.label} [{bar:<30}] {100 * frac:5.1f}% {human_bytes(self.done)}/"
            f"{human_bytes(self.total)} {human_bytes(rate)}/s ETA {eta_s}"
        )
        return f"{text} {note}".rstrip()

    def _draw(self, note: str) -> None:
        if self._tty:
            self.stream.write("\r\033[K" + self.line(note)[:200])
        else:
            self.stream.write(self.line(note) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Draws the final state and ends the line."""
        if self.stream is None:
            return
        self._draw("")
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start
