"""The progress bar and summary of ``xnatfs prefetch``: bytes and files done of
the total, what was already cached, the rate, the failures.

Counted from several threads (the readers), drawn from one: on a terminal the
line is redrawn in place; elsewhere (a batch job's log) one line is written
every ``interval`` seconds, so that a log shows progress without a line per
file.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

TTY_REDRAW = 0.2  # s between redraws on a terminal


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class Progress:
    """What a prefetch has done so far; every method may be called from any thread."""

    stream: TextIO = field(default_factory=lambda: sys.stderr)
    interval: float = 5.0  # s between lines when the stream is no terminal
    files_total: int = 0
    bytes_total: int = 0
    files_done: int = 0
    bytes_done: int = 0
    files_cached: int = 0   # already cached (or already in --to DIR): not read at all
    bytes_cached: int = 0   # bytes that came from the cache, whole files or parts
    bytes_fetched: int = 0  # bytes that had to come from XNAT
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    already_word: str = "already cached"  # with --to: "already in DIR"
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _last_draw: float = 0.0
    _drawn: bool = False

    def __post_init__(self) -> None:
        self.tty = self.stream.isatty()

    def listed(self, files: int, size: int) -> None:
        with self._lock:
            self.files_total += files
            self.bytes_total += size

    def moved(self, n: int) -> None:
        """``n`` more bytes of a file were read."""
        with self._lock:
            self.bytes_done += n

    def finished(self, size: int, cached: int) -> None:
        """A file was read whole; ``cached`` of its bytes were in the cache before."""
        with self._lock:
            self.files_done += 1
            self.bytes_cached += cached
            self.bytes_fetched += max(0, size - cached)

    def already(self, size: int) -> None:
        """A file was complete already: counted done without being read."""
        with self._lock:
            self.files_done += 1
            self.files_cached += 1
            self.bytes_done += size
            self.bytes_cached += size

    def failed(self, path: str, why: str, read: int) -> None:
        with self._lock:
            self.failures.append((path, why))
            self.bytes_done -= read  # the total keeps the file: the bar never reaches it

    # ---------------------------------------------------------------- drawing
    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        width = 24
        share = self.bytes_done / self.bytes_total if self.bytes_total else 1.0
        filled = min(width, int(width * share))
        bar = "#" * filled + "-" * (width - filled)
        text = (f"[{bar}] {human_bytes(self.bytes_done)} / {human_bytes(self.bytes_total)}"
                f"  {self.files_done}/{self.files_total} files")
        if self.files_cached:
            text += f" ({self.files_cached} {self.already_word})"
        text += f"  {human_bytes((self.bytes_done - self.bytes_cached) / elapsed)}/s"
        if self.failures:
            text += f"  {len(self.failures)} failed"
        return text

    def draw(self, *, force: bool = False) -> None:
        """Redraw (terminal) or write a line (log) if it is time to."""
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last_draw < (TTY_REDRAW if self.tty else self.interval):
                return
            self._last_draw = now
            line = self.line()
        if self.tty:
            self.stream.write(f"\r{line}\x1b[K")
        else:
            self.stream.write(f"prefetch: {line}\n")
        self.stream.flush()
        self._drawn = True

    def summary(self, *, interrupted: bool = False, into: str | None = None) -> str:
        """The closing lines: what was done, from where, how fast, what failed."""
        elapsed = time.monotonic() - self.started
        rate = human_bytes(self.bytes_fetched / elapsed) if elapsed > 0 else "-"
        lines = [
            f"prefetch {'interrupted' if interrupted else 'done'}: {self.files_done} of "
            f"{self.files_total} files, {human_bytes(self.bytes_done)} of "
            f"{human_bytes(self.bytes_total)} in {elapsed:.1f} s",
            f"  {self.already_word}: {self.files_cached} files; from the cache: "
            f"{human_bytes(self.bytes_cached)}; fetched (XNAT, or a shared cache): "
            f"{human_bytes(self.bytes_fetched)} ({rate}/s)"]
        if into is not None:
            lines.append(f"  written to {into}")
        if self.failures:
            lines.append(f"  failed: {len(self.failures)} files")
            lines += [f"    {path}: {why}" for path, why in self.failures]
        if interrupted:
            lines.append("  run the same command again to go on where it stopped")
        return "\n".join(lines) + "\n"

    def close(self, *, interrupted: bool = False, into: str | None = None) -> None:
        self.draw(force=True)
        if self.tty:
            self.stream.write("\n")
        self.stream.write(self.summary(interrupted=interrupted, into=into))
        self.stream.flush()
