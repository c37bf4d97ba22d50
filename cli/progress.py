"""Progress on stderr for steps that take more than a second (a live counter on terminals only)."""

from __future__ import annotations

import sys
import time


class Progress:
    """Call step(i, total, label) repeatedly; prints only once the step has run for `delay`
    seconds."""

    def __init__(self, title: str, enabled: bool = True, delay: float = 1.0):
        self.title, self.enabled, self.delay = title, enabled, delay
        self.start = time.perf_counter()
        self.shown = False

    def __call__(self, i: int, total: int, label: str = "") -> None:
        if (
            not self.enabled
            or not sys.stderr.isatty()
            or time.perf_counter() - self.start < self.delay
        ):
            return
        sys.stderr.write(f"  {self.title} {i + 1}/{total} {label[:60]:<60}\r")
        sys.stderr.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown and sys.stderr.isatty():
            sys.stderr.write(" " * 80 + "\r")


class Step:
    """Context manager printing 'title ...' on stderr if the block runs for more than `delay`
    seconds."""

    def __init__(self, title: str, enabled: bool = True):
        self.title, self.enabled = title, enabled

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        took = time.perf_counter() - self.start
        if self.enabled and took > 1.0 and exc[0] is None:
            sys.stderr.write(f"  {self.title}: {took:.1f} s\n")
        return False
