"""A long run of the reference-model test under faults, with its figures.

    python contrib/model_soak.py --minutes 30 [--seed 1] [--examples 10] [--steps 50]

Runs the rules of ``tests/mount/test_model.py`` (every area of a real mount,
503s, dropped and cut bodies, hangs, expired sessions, restarts, changes
behind the mount's back; each answer held to the model) batch after batch,
seeds ``seed``, ``seed + 1``..., until the time is up, then prints what the
README's "Proof under faults" figures are made of: operations by kind,
faults injected, wrong bytes, lost writes, maximum and 99th-percentile
latency, and the mount process's peak memory, file descriptors and threads
at the end. Needs root (or FUSE) as the suite does; exits 1 at the first
broken invariant, with Hypothesis's shrunk sequence and the seed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.mount.conftest import daemon_pid  # noqa: E402
from tests.mount.model_setup import opened_world  # noqa: E402
from tests.mount.test_model import run_examples  # noqa: E402
from xnatfs.testing.harness import TestServer  # noqa: E402


def process_figures(pid: int) -> str:
    """Peak resident memory, open file descriptors and threads of a process."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return (f"mount process: peak RSS {status['VmHWM'].strip()}, RSS now "
            f"{status['VmRSS'].strip()}, {fds} file descriptors, "
            f"{status['Threads'].strip()} threads")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--examples", type=int, default=10, help="sequences per batch")
    parser.add_argument("--steps", type=int, default=50, help="rules per sequence, at most")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="xnatfs-soak-") as tmp:
        root = Path(tmp)
        data = root / "data"
        with TestServer(data, dataset="demo"):  # builds the demo data set once
            pass
        (data / "requests.log").unlink(missing_ok=True)
        with opened_world(data, root / "home") as world:
            pid = daemon_pid(world.mount.path)
            print(f"at the start: {process_figures(pid)}", flush=True)
            stop_at = time.monotonic() + args.minutes * 60
            seed_value = args.seed
            while time.monotonic() < stop_at:
                run_examples(world, args.examples, args.steps, seed_value)
                print(f"seed {seed_value} done; {sum(world.judge.figures.ops.values())} "
                      "operations so far", flush=True)
                seed_value += 1
            print(f"seeds {args.seed}..{seed_value - 1}, {args.minutes:g} min\n"
                  f"{world.judge.figures.summary()}\n{process_figures(pid)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
