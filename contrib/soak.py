#!/usr/bin/env python3
"""The xnatfs soak (issue 24): a real mount under the test server's faults.

    python contrib/soak.py --minutes N [--seed S] [--readers 64] [--writers 16]
                           [--timeout 5] [--server-range] [--no-long-hang] [--shared-cache]
                           [--json PATH] [--keep]

Builds the demo data set in a temporary folder, serves it with ``xnatfs
testserver``, mounts it, and for N minutes runs 64 readers of different
files (whole and partial reads, stats, listings; every byte checked against
the server's) and 16 writers (half write files into resources, each read
back; half drop DICOM zips into ``uploads/``) while a seeded schedule injects
the server's faults. Then the faults stop, ``xnatfs uploads list`` must list
every write whose close failed, ``xnatfs uploads retry`` sends them, and
XNAT must hold every owed write with its MD5. A watchdog fails the run (and
prints the operation) when one outlasts its bound. Prints the figures the
README's "Proof under faults" carries; exits 1 when an invariant broke.
The machinery is ``xnatfs.testing.soak``, which ``tests/mount/test_soak.py``
runs for a short while in the suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xnatfs.testing.soak import SoakConfig, run_soak  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--seed", type=int, default=24)
    parser.add_argument("--readers", type=int, default=64)
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=5.0, help="the mount's --timeout")
    parser.add_argument("--server-range", action="store_true",
                        help="the server honours HTTP Range (real XNAT 1.8 does not)")
    parser.add_argument("--shared-cache", action="store_true",
                        help="the mount publishes what it downloads into a shared cache tier "
                             "(in the work folder), under the same faults")
    parser.add_argument("--no-long-hang", action="store_true",
                        help="leave out the phase where the server is silent for longer "
                             "than any operation's bound (4 x timeout + 5 s)")
    parser.add_argument("--json", type=Path, help="write the figures as JSON here too")
    parser.add_argument("--keep", action="store_true",
                        help="keep the working folder (server data, mount log)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="xnatfs-soak-"))
    config = SoakConfig(seconds=args.minutes * 60, seed=args.seed, workdir=workdir,
                        readers=args.readers, writers=args.writers, timeout=args.timeout,
                        server_range=args.server_range, long_hang=not args.no_long_hang,
                        shared_cache=args.shared_cache)
    print(f"xnatfs soak, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.node()}: {os.cpu_count()} CPUs, {platform.platform()}; "
          f"work in {workdir}", flush=True)
    try:
        report = run_soak(config, say=lambda text: print(text, flush=True))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report.text())
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2, default=str))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
