"""Fixtures shared by the whole suite: real test-server subprocesses."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from xnatfs.testing.harness import TestServer


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo data set, built once for the whole run (seconds of work; a copy
    takes a fraction of one). Never served itself: servers start on copies
    (:func:`demo_copy`), which they see as built and do not build again."""
    data = tmp_path_factory.mktemp("demo-built") / "data"
    with TestServer(data, dataset="demo"):
        pass
    (data / "requests.log").unlink(missing_ok=True)
    return data


@pytest.fixture(scope="session")
def demo_copy(demo_data: Path) -> Callable[[Path], Path]:
    """``demo_copy(data_dir)``: a fresh copy of the built demo data set at
    ``data_dir`` (which must not exist yet), to start a ``TestServer`` on."""
    def copy(data_dir: Path) -> Path:
        shutil.copytree(demo_data, data_dir)
        return data_dir

    return copy


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory,
                demo_copy: Callable[[Path], Path]) -> Iterator[TestServer]:
    """One server with the demo data set, shared by tests that only read."""
    server = TestServer(demo_copy(tmp_path_factory.mktemp("demo") / "data"), dataset="demo")
    with server:
        yield server


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[TestServer]:
    """A server of one's own (empty but for the accounts), for tests that write or break it."""
    server = TestServer(tmp_path / "data", dataset="none")
    with server:
        yield server


class ServersStartedAhead:
    """Servers of their own for tests, each started while the test before it
    runs: a start is a second or two, mostly imports, that the taker then does
    not wait for. One is started ahead at a time. A returned server is told to
    stop at once, and waited for in the background (its graceful end can take
    a second)."""

    def __init__(self, root: Path, dataset: str,
                 prepare: Callable[[Path], Path] = lambda data_dir: data_dir) -> None:
        self.root = root
        self.dataset = dataset
        self.prepare = prepare  # fills a new data directory (or leaves it to the server)
        self.numbers = itertools.count()
        self.starter = ThreadPoolExecutor(1, thread_name_prefix="server-ahead")
        self.stopper = ThreadPoolExecutor(1, thread_name_prefix="server-stop")
        self.ahead: Future[TestServer] | None = None

    def _start(self) -> TestServer:
        data_dir = self.prepare(self.root / f"{self.dataset}{next(self.numbers)}" / "data")
        return TestServer(data_dir, dataset=self.dataset).start()

    def take(self) -> TestServer:
        """A started server of the caller's own, to :meth:`give_back` after use."""
        taken = self.ahead or self.starter.submit(self._start)
        self.ahead = self.starter.submit(self._start)
        return taken.result()

    def give_back(self, server: TestServer) -> None:
        """Stop ``server``: SIGTERM now; its exit is awaited in the background."""
        if server.process is not None:
            server.process.terminate()
        self.stopper.submit(server.stop)

    def close(self) -> None:
        if self.ahead is not None:
            try:
                self.ahead.result().stop()
            except Exception:  # noqa: BLE001 - it was never handed out: nothing to report
                pass
        self.starter.shutdown()
        self.stopper.shutdown()


@pytest.fixture(scope="session")
def empty_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServersStartedAhead]:
    servers = ServersStartedAhead(tmp_path_factory.mktemp("empty-servers"), "none")
    yield servers
    servers.close()


@pytest.fixture(scope="session")
def demo_servers(tmp_path_factory: pytest.TempPathFactory,
                 demo_copy: Callable[[Path], Path]) -> Iterator[ServersStartedAhead]:
    servers = ServersStartedAhead(tmp_path_factory.mktemp("demo-servers"), "demo", demo_copy)
    yield servers
    servers.close()


@pytest.fixture
def started_fresh_server(empty_servers: ServersStartedAhead) -> Iterator[TestServer]:
    """What :func:`fresh_server` is (a server of one's own, empty but for the
    accounts, for tests that write or break it), started ahead of the test; its
    data directory is not under the test's ``tmp_path``."""
    server = empty_servers.take()
    try:
        yield server
    finally:
        empty_servers.give_back(server)


@pytest.fixture
def started_demo_server(demo_servers: ServersStartedAhead) -> Iterator[TestServer]:
    """A demo server of one's own (on a copy of :func:`demo_data`), for a test that
    changes the demo's data, started ahead of the test."""
    server = demo_servers.take()
    try:
        yield server
    finally:
        demo_servers.give_back(server)
