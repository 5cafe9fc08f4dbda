"""Fixtures shared by the whole suite: real test-server subprocesses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from xnatfs.testing.harness import TestServer


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:
    """One server with the demo data set, shared by tests that only read."""
    server = TestServer(tmp_path_factory.mktemp("demo") / "data", dataset="demo")
    with server:
        yield server


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[TestServer]:
    """A server of one's own (empty but for the accounts), for tests that write or break it."""
    server = TestServer(tmp_path / "data", dataset="none")
    with server:
        yield server
