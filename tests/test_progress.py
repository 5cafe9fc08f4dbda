"""The prefetch progress bar: redrawn in place on a terminal, closed by a summary."""

from __future__ import annotations

import io

from xnatfs.progress import Progress, human_bytes


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_line_is_redrawn_in_place_and_the_summary_follows() -> None:
    screen = Terminal()
    progress = Progress(stream=screen)
    progress.listed(3, 3 * 1024 * 1024)
    progress.draw(force=True)
    progress.already(1024 * 1024)
    progress.moved(1024 * 1024)
    progress.finished(1024 * 1024, cached=0)
    progress.failed("P/S/E/resources/R/files/x", "Input/output error", read=0)
    progress.close()
    text = screen.getvalue()
    assert text.startswith("\r[") and text.count("\r") == 2 and "\x1b[K" in text
    assert "2/3 files (1 already cached)" in text and "1 failed" in text
    summary = text.split("\n", 1)[1]  # after the bar's line
    assert summary.startswith("prefetch done: 2 of 3 files, 2.0 MiB of 3.0 MiB")
    assert ("already cached: 1 files; from the cache: 1.0 MiB; "
            "fetched (XNAT, or a shared cache): 1.0 MiB") in summary
    assert "    P/S/E/resources/R/files/x: Input/output error" in summary


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 1024**3)] == [
        "0 B", "1023 B", "1.5 KiB", "5.0 GiB"]
