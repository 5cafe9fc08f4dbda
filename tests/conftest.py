"""Fixtures shared by the whole suite: real test-server subprocesses."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
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
