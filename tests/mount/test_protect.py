"""Protecting the server (issue 23 point 3), through real mounts: the request
ceilings under a parallel ``cp -r``, a 429 with ``Retry-After`` waited for by
the whole mount, one login after a session expires under load. Each is
checked in the test server's request log (each entry's end time and duration).
"""

from __future__ import annotations

import os
import sys
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xnatfs.testing.harness import TestServer

from .conftest import Mount, make_env, module_mount, mount_xnatfs, peak_in_flight, unmount

MAX_REQUESTS = 3
RATE = 10.0
BURST = 20  # the mount's bucket: 2 s worth of RATE


@pytest.fixture(scope="module")
def server(demo_copy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:  # noqa: ANN001
    with TestServer(demo_copy(tmp_path_factory.mktemp("protect") / "data"),
                    dataset="demo") as server:
        yield server


@pytest.fixture(scope="module")
def mount(server: TestServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with module_mount(server, tmp_path_factory.mktemp("protect-home"), "--max-requests",
                      str(MAX_REQUESTS), "--max-request-rate", str(RATE)) as mount:
        yield mount


def sessions(mount: Mount) -> list[Path]:
    """Every session folder of the demo project the tests use."""
    project = mount.path / "NEURO_PUB"
    return sorted(session for subject in sorted(project.iterdir()) if subject.is_dir()
                  for session in sorted(subject.iterdir()) if (session / "scans").is_dir())


def starts(entries: list[dict]) -> list[float]:
    return sorted(e["t"] - e["ms"] / 1000 for e in entries)


def test_ceilings_hold_under_a_parallel_copy(mount: Mount, tmp_path: Path) -> None:
    first, second = sessions(mount)[:2]
    mark = mount.server.log_mark()
    mount.server.set_knobs(latency_ms=250)  # slow answers: requests overlap
    try:
        copies = [subprocess.Popen(["cp", "-r", str(folder), str(tmp_path / folder.name)])
                  for folder in (first, second)]
        assert [copy.wait(timeout=120) for copy in copies] == [0, 0]
    finally:
        mount.server.set_knobs(latency_ms=0)
    entries = mount.server.requests_since(mark)
    copied = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(copied) > BURST
    assert len(entries) > 2 * BURST  # enough requests to run out of the burst
    assert peak_in_flight(entries) <= MAX_REQUESTS
    assert peak_in_flight(entries) == MAX_REQUESTS  # the ceiling was reached
    times = starts(entries)
    for i, begin in enumerate(times):  # any window: at most the burst plus the rate
        for j in range(i, len(times)):
            assert j - i + 1 <= BURST + RATE * (times[j] - begin) + 1
    for path in copied[:20]:  # and the copies are whole
        source = (first if path.is_relative_to(tmp_path / first.name) else second) \
            / path.relative_to(tmp_path / path.relative_to(tmp_path).parts[0])
        assert path.stat().st_size == source.stat().st_size


def test_a_429_with_retry_after_pauses_the_whole_mount(mount: Mount) -> None:
    """While the server throttles, parallel readers learn it once each at most:
    those in flight get a 429, the rest wait for the pause, nobody asks sooner."""
    session = sessions(mount)[2]
    files = [p for p in session.rglob("*") if p.is_file()]  # listings now cached
    assert len(files) >= 8
    mark = mount.server.log_mark()
    mount.server.set_knobs(throttle_status=429, throttle_retry_after_s=2,
                           throttle_until=time.time() + 1.0)
    try:
        readers = [subprocess.Popen(["cat", *map(str, files[n::8])], stdout=subprocess.DEVNULL)
                   for n in range(8)]
        assert [reader.wait(timeout=60) for reader in readers] == [0] * 8
    finally:
        mount.server.set_knobs(throttle_until=0.0)
    entries = mount.server.requests_since(mark)
    throttled = [e for e in entries if e["fault"] == "throttled"]
    assert 1 <= len(throttled) <= MAX_REQUESTS
    told = min(e["t"] for e in throttled)
    served_after = [e["t"] - e["ms"] / 1000 for e in entries
                    if e["fault"] != "throttled" and e["t"] - e["ms"] / 1000 > told]
    assert served_after and min(served_after) >= told + 2.0 - 0.01


def test_one_login_when_the_session_expires_under_load(mount: Mount) -> None:
    folders = [scan for session in sessions(mount)[3:] for scan in (session / "scans").iterdir()]
    assert len(folders) >= 3
    mark = mount.server.log_mark()
    assert mount.server.expire_sessions() >= 1
    listers = [subprocess.Popen(["ls", "-lR", str(folder)], stdout=subprocess.DEVNULL)
               for folder in folders]
    assert [lister.wait(timeout=60) for lister in listers] == [0] * len(folders)
    entries = mount.server.requests_since(mark)
    logins = [e for e in entries if e["route"] == "jsession" and e["method"] == "POST"]
    assert len(logins) == 1
    assert sum(e["status"] == 401 for e in entries) >= 2  # parallel requests did find it gone
    assert os.listdir(mount.path)


def xnatfs(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xnatfs.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_token_file_mounts_without_a_password(server: TestServer, tmp_path: Path) -> None:
    """``xnatfs token issue --to FILE`` on the login node; batch jobs mount with
    ``--credentials-file FILE`` (or XNATFS_CREDENTIALS_FILE) and log in with the
    token; a file others can read is refused with the fix in the message."""
    env = make_env(tmp_path / "issuer")
    token_file = tmp_path / "xnat-token.toml"
    done = xnatfs("token", "issue", "--url", server.url, "--to", str(token_file), env=env)
    assert done.returncode == 0, done.stderr
    assert os.stat(token_file).st_mode & 0o777 == 0o600
    text = token_file.read_text()
    assert "alias = " in text and "password" not in text
    job_env = {k: v for k, v in make_env(tmp_path / "job").items()
               if k not in ("XNAT_USER", "XNAT_PASS")}
    mark = server.log_mark()
    job_env["XNATFS_CREDENTIALS_FILE"] = str(token_file)
    home = tmp_path / "job"
    mount_xnatfs(server, tmp_path / "jobmnt", home / "blocks", job_env, [])
    try:
        assert "NEURO_PUB" in os.listdir(tmp_path / "jobmnt")
    finally:
        unmount(tmp_path / "jobmnt")
    logins = [e for e in server.requests_since(mark)
              if e["route"] == "jsession" and e["method"] == "POST"]
    assert logins  # the token's alias was the user
    token_file.chmod(0o644)
    (tmp_path / "refused").mkdir()
    refused = xnatfs("mount", server.url, str(tmp_path / "refused"), "--credentials-file",
                     str(token_file), env=job_env)
    assert refused.returncode != 0
    assert f"chmod 600 {token_file}" in refused.stderr
