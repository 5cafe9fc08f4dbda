"""The command line's own helpers (the commands themselves run against real
mounts in tests/mount/test_cli.py)."""

from __future__ import annotations

import logging
import os
import sys

from xnatfs.cli import OneLineFormatter


def test_log_messages_stay_one_line() -> None:
    """A server's file name with a newline or an escape sequence cannot forge a
    log line or reach the terminal; a traceback keeps its lines."""
    formatter = OneLineFormatter("%(levelname)s %(message)s")
    name = "a.dcm\nERROR forged line\x1b[2J"
    record = logging.LogRecord("xnatfs", logging.WARNING, __file__, 1,
                               "download of %s failed", (name,), None)
    assert formatter.format(record) == (
        "WARNING download of a.dcm\\nERROR forged line\\x1b[2J failed")
    # C1 controls (CSI), Unicode line separators, undecodable bytes (surrogates).
    odd = "b\x9b2J\u2028c" + os.fsdecode(b"\xff")
    record = logging.LogRecord("xnatfs", logging.WARNING, __file__, 1, "%s", (odd,), None)
    assert formatter.format(record) == "WARNING b\\x9b2J\\u2028c\\udcff"
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("xnatfs", logging.ERROR, __file__, 1, "bug in %s", (name,),
                                   sys.exc_info())
    first, *traceback = formatter.format(failed).splitlines()
    assert first == "ERROR bug in a.dcm\\nERROR forged line\\x1b[2J"
    assert traceback[0].startswith("Traceback") and traceback[-1] == "ValueError: boom"
