"""Smoke test of the benchmark (``contrib/bench.py --quick``): it runs and gives every figure.

No timing is asserted here, by design (issue 5): the numbers depend on the
machine and on whatever else runs on it. A figure may be ``n/a (reason)`` when
a scenario failed; what must not happen is a crash or a missing scenario, or
an S9 write that XNAT's listing does not show as written (the benchmark then
exits 1 and says ``VERIFICATION FAILED``).

The bench data set is built once (~20 s, 1.5 GB) in ``~/.cache/xnatfs/bench-server``,
or in ``$XNATFS_BENCH_DATA`` when set, and reused by later runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from numbers import Number
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = [f"S{n}" for n in range(11)]


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


pytestmark = [
    pytest.mark.skipif(not fuse_available(), reason="FUSE is not available"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in ("curl", "unzip", "dd")),
                       reason="the benchmark needs curl, unzip and dd"),
    pytest.mark.slow,
]


@pytest.mark.timeout(900)
def test_quick_benchmark_reports_every_scenario(tmp_path: Path) -> None:
    results_path = tmp_path / "results.json"
    cmd = [sys.executable, str(REPO / "contrib" / "bench.py"), "--quick",
           "--json", str(results_path), "--workdir", str(tmp_path / "work")]
    if os.environ.get("XNATFS_BENCH_DATA"):
        cmd += ["--data", os.environ["XNATFS_BENCH_DATA"]]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=840, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(results_path.read_text())
    assert "error" not in results["meta"], results["meta"]["error"]

    for scenario in SCENARIOS:
        figures = results["scenarios"].get(scenario)
        assert figures, f"{scenario} missing from the results"
        for figure in figures:
            value = figure["value"]
            assert (isinstance(value, Number) and value >= 0) or (
                isinstance(value, str) and value.startswith("n/a (") and len(value) > 6), \
                f"{scenario}: {value!r} is neither a number nor an explained n/a"
            assert figure["runs"], f"{scenario}: no runs recorded"
    for scenario, range_mode in [(s, r) for s in ("S1", "S2", "S3", "S4", "S5", "S6", "S7")
                                 for r in ("off", "on")]:
        assert any(f["range"] == range_mode for f in results["scenarios"][scenario]), \
            f"{scenario} was not run with Range {range_mode}"
    # S9 writes with and without --write-behind, each checked against XNAT's listing.
    assert {f["mode"] for f in results["scenarios"]["S9"]} == {"--write-behind", "default mount"}
    for figure in results["scenarios"]["S9"]:
        for run in figure["runs"]:
            assert not str(run.get("error", "")).startswith("verification failed"), run["error"]
            assert "error" in run or run["extra"]["verified"], run
    # S10: four mounts on one shared tier against four xnatpy processes; the ratio
    # is of bytes XNAT sent (from the server's log) to bytes the mounts read.
    ratio, wall = results["scenarios"]["S10"]
    assert ratio["target"] == "<= 0.3" and wall["baseline"]["name"] == "4 xnatpy at once"
    for run in ratio["runs"]:
        if "error" not in run:
            extra = run["extra"]
            assert run["value"] == extra["bytes_served"] / extra["bytes_read"]
            assert extra["bytes_read"] > 4 * 20 * 10**6 and extra["files"] >= 224
    # The table names every scenario, and says where the results went.
    for scenario in SCENARIOS:
        assert f"\n{scenario} " in result.stdout
    assert str(results_path) in result.stdout
