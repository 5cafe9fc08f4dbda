"""A short seeded soak (issue 24): 64 readers of different files and 16 writers
on a real mount while the server fails, drops, cuts, delays, hangs, throttles
and forgets sessions; no wrong byte, no lost write, no operation past its
bound, no descriptor or thread left behind; with a shared cache tier (issue
23) that gets every block downloaded. ``contrib/soak.py --minutes N``
runs the same machinery (:mod:`xnatfs.testing.soak`) for longer."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from xnatfs.testing.soak import FAULTS, SoakConfig, run_soak
from xnatfs.testing.soakload import Ledger, compare

pytestmark = pytest.mark.slow

SEED = 2024


def test_soak_under_faults(tmp_path: Path, demo_copy: Callable[[Path], Path]) -> None:
    config = SoakConfig(seconds=25, seed=SEED, workdir=tmp_path, phase=(1.5, 3.0),
                        data_dir=demo_copy(tmp_path / "data"), shared_cache=True)
    report = run_soak(config, say=print)
    print(report.text())
    assert not report.failures, report.text()
    # The run did what it says: every kind of fault, every kind of operation.
    assert set(report.fault_phases) == set(FAULTS), report.fault_phases
    injected = set(report.faults_in_log)
    assert {"5xx", "hang", "throttled"} <= injected and {"drop", "truncate"} & injected
    assert report.sessions_expired > 0
    assert {"read", "pread", "stat", "listdir", "readback", "result", "upload"} <= set(report.ops)
    assert report.writes["result done"] > 0 and report.writes["upload done"] > 0
    # Publishing under faults (one mount's reads come from its memory, not the
    # tier: tests/mount/test_shared_cache.py reads through several mounts).
    assert report.status["shared_cache"]["entries_published"] > 0
    assert report.status["shared_cache"]["failed_or_hung_calls"] == 0


def test_the_checks_can_fail() -> None:
    """A wrong byte, a short read and an operation past its bound are caught
    (the soak above passing means something only if these are)."""
    ledger = Ledger({"read": 0.3})
    compare(ledger, "f", b"abXd", b"abcdef", 0)
    compare(ledger, "f", b"ef", b"abcdef", 4)
    assert ledger.wrong_bytes == 1 and "1 wrong bytes" in ledger.wrong[0]
    watchdog = threading.Thread(target=ledger.watch, args=(0.05,))
    watchdog.start()
    with ledger.op("read", "slow-file") as op:
        ledger.stop.wait(5)  # the watchdog sets stop once the bound is passed
    ledger.finished.set()
    watchdog.join()
    assert op.error is None and ledger.stop.is_set()
    assert ledger.stuck and "read slow-file" in ledger.stuck[0]
    with ledger.op("read", "missing") as failed:
        raise FileNotFoundError(2, "No such file")
    assert failed.error == "ENOENT" and ledger.errors["read"]["ENOENT"] == 1
