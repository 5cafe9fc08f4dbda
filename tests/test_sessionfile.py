"""One login for a job array: eight client processes started at once, sharing
a session file (``--session-file``), against one server whose request log
counts the logins; then the shared session expires and is renewed once."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
import trio

from xnatfs.client import XnatClient
from xnatfs.client.sessionfile import SessionFile
from xnatfs.credentials import Credentials
from xnatfs.testing.harness import TestServer

NODES = 8

def node(url: str, session_file: str, results: multiprocessing.Queue) -> None:
    """One node of the array: a client of its own (forked: no interpreter start-up)."""
    async def main() -> int:
        credentials = Credentials(url, "admin", "admin")
        async with XnatClient(credentials, session_file=Path(session_file)) as client:
            return len(await client.list_projects())

    try:
        results.put(trio.run(main))
    except BaseException as exc:
        results.put(repr(exc))
        raise


def run_array(server: TestServer, session_file: Path) -> list[int | str]:
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    nodes = [fork.Process(target=node, args=(server.url, str(session_file), results))
             for _ in range(NODES)]
    for process in nodes:
        process.start()
    outputs = [results.get(timeout=90) for _ in nodes]
    for process in nodes:
        process.join(timeout=30)
    return outputs


def logins(entries: list[dict]) -> int:
    return sum(e["route"] == "jsession" and e["method"] == "POST" for e in entries)


def test_an_array_of_nodes_logs_in_once(started_demo_server: TestServer, tmp_path: Path) -> None:
    server = started_demo_server
    shared = tmp_path / "shared" / "xnat-session"
    shared.parent.mkdir()
    mark = server.log_mark()
    outputs = run_array(server, shared)
    entries = server.requests_since(mark)
    assert len(set(outputs)) == 1 and isinstance(outputs[0], int) and outputs[0] > 0
    assert logins(entries) == 1
    assert not any(e["method"] == "DELETE" for e in entries)  # the shared one stays
    assert os.stat(shared).st_mode & 0o777 == 0o600
    assert not shared.with_name(shared.name + ".claim").exists()

    # The shared session expires: the next array renews it with one login.
    assert server.expire_sessions() >= 1
    mark = server.log_mark()
    run_array(server, shared)
    assert logins(server.requests_since(mark)) == 1


async def test_a_stale_claim_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "session"
    first = SessionFile(path, "http://x", "u")
    assert await first.claim()
    assert not await SessionFile(path, "http://x", "u").claim()  # held
    claim = path.with_name(path.name + ".claim")
    old = time.time() - 3600
    os.utime(claim, (old, old))
    second = SessionFile(path, "http://x", "u")
    assert await second.claim()  # the holder died long ago
    await second.publish("SESSIONID123456")
    assert await first.read() == "SESSIONID123456"
    assert await SessionFile(path, "http://other", "u").read() is None  # another site's
    path.chmod(0o644)
    assert await first.read() is None  # open to others: not used


@pytest.fixture
def autojump(autojump_clock):  # noqa: ANN001, ANN201
    return autojump_clock


async def test_waiters_fall_back_when_the_claimant_goes_silent(tmp_path: Path, autojump) -> None:  # noqa: ANN001
    path = tmp_path / "session"
    holder = SessionFile(path, "http://x", "u")
    assert await holder.claim()
    begun = trio.current_time()
    assert await SessionFile(path, "http://x", "u").wait_for_new(None) is None
    assert trio.current_time() - begun >= 20.0  # CLAIM_WAIT, then a random delay
