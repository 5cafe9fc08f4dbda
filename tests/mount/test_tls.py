"""A site served over HTTPS: a certificate the mount cannot trust is said at
once, as such, with what to do, rather than retried as a server that is down;
``--ca-bundle``, the ``ca_bundle`` config key and ``SSL_CERT_FILE`` trust it."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xnatfs.client import XnatClient
from xnatfs.credentials import Credentials
from xnatfs.errors import TlsFailure, errno_for
from xnatfs.testing.certificates import self_signed_certificate
from xnatfs.testing.harness import TestServer

from .conftest import make_env, unmount


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestServer, Path]]:
    """The test server over HTTPS with a self-signed certificate for 127.0.0.1 only."""
    root = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_certificate(root / "certificate", ip_addresses=("127.0.0.1",))
    server = TestServer(root / "data", dataset="none",
                        args=["--tls-cert", str(cert), "--tls-key", str(key)])
    with server:
        assert server.url.startswith("https://127.0.0.1:")
        yield server, cert


def run_mount(url: str, mountpoint: Path, home: Path, *options: str,
              env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "xnatfs.cli", "mount", url, str(mountpoint),
                             "--cache-dir", str(home / "blocks"), "--log-level", "INFO",
                             "--log-file", str(home / "mount.log"), *options],
                            env=env or make_env(home), capture_output=True, text=True,
                            timeout=120)
    return result, time.monotonic() - started


def test_an_untrusted_certificate_is_refused_at_once_and_said(tls_server, tmp_path: Path) -> None:  # noqa: ANN001
    server, _ = tls_server
    result, _ = run_mount(server.url, tmp_path / "mnt", tmp_path)
    assert result.returncode != 0 and not os.path.ismount(tmp_path / "mnt")
    message = result.stderr
    assert "certificate is not trusted" in message and "self-signed certificate" in message
    assert "--ca-bundle" in message and "--insecure" in message
    log = (tmp_path / "mount.log").read_text()
    # One attempt: no retry, and not taken for a server that is down.
    assert "attempt 2" not in log and "seems down" not in log, log


async def test_the_client_makes_one_attempt_and_fails_within_a_second(tls_server) -> None:  # noqa: ANN001
    """What the mount does at start, timed in one process (a command's own start
    is seconds on a loaded machine): four attempts and their backoff took 3.5 s."""
    server, _ = tls_server
    client = XnatClient(Credentials(server.url, "admin", "admin"))
    started = time.monotonic()
    with pytest.raises(TlsFailure) as caught:
        async with client:
            pass
    assert time.monotonic() - started < 1.0
    assert errno_for(caught.value) == errno.EIO and "self-signed" in str(caught.value)
    stats = client.statistics()
    assert stats["session.login"] == 1 and "retries" not in stats and "server_down" not in stats


def test_a_ca_bundle_makes_the_certificate_trusted(tls_server, tmp_path: Path) -> None:  # noqa: ANN001
    server, cert = tls_server
    mountpoint = tmp_path / "mnt"
    result, _ = run_mount(server.url, mountpoint, tmp_path, "--ca-bundle", str(cert))
    try:
        assert result.returncode == 0, result.stderr
        assert ".xnatfs-status.json" in os.listdir(mountpoint)
    finally:
        unmount(mountpoint)
    # The same through SSL_CERT_FILE, which httpx honours, as the message says.
    env = dict(make_env(tmp_path / "env"), SSL_CERT_FILE=str(cert))
    result, _ = run_mount(server.url, mountpoint, tmp_path / "env", env=env)
    try:
        assert result.returncode == 0, result.stderr
    finally:
        unmount(mountpoint)


def test_a_certificate_for_another_host_is_said_to_be_so(tls_server, tmp_path: Path) -> None:  # noqa: ANN001
    """Trusted (``ca_bundle`` in the config file), but issued for 127.0.0.1 only."""
    server, cert = tls_server
    config = tmp_path / "config" / "xnatfs" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'[mount]\nca_bundle = "{cert}"\n')
    url = server.url.replace("127.0.0.1", "localhost")
    result, _ = run_mount(url, tmp_path / "mnt", tmp_path)
    assert result.returncode != 0
    assert "certificate is for another host name" in result.stderr, result.stderr
    assert "Hostname mismatch" in result.stderr and "not trusted" not in result.stderr
    assert "attempt 2" not in (tmp_path / "mount.log").read_text()


def test_an_unreadable_ca_bundle_is_named(tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-bundle.pem"
    bogus.write_text("no certificate here\n")
    result, _ = run_mount("https://127.0.0.1:9", tmp_path / "mnt", tmp_path,
                          "--ca-bundle", str(bogus))
    assert result.returncode != 0 and f"--ca-bundle {bogus}" in result.stderr, result.stderr
